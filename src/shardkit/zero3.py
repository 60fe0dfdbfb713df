"""DeepSpeed ZeRO-3 applied from outside the model: config loading, HF-style "auto" resolution, and the
strategy the training loop drives."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UsageError


def load_deepspeed_json(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--deepspeed {path!r}: no such file")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise UsageError(f"{path}:{error.lineno}:{error.colno}: not valid JSON ({error.msg})") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path}: a DeepSpeed config is a JSON object")
    stage = config.get("zero_optimization", {}).get("stage")
    if stage != 3:
        raise UsageError(f"{path}: zero_optimization.stage is {stage!r}; the table's DeepSpeed rows are ZeRO-3")
    return config


def _fill(config: dict, dotted: str, value, path: str) -> None:
    """Set an "auto" (or absent) value; an explicit value that disagrees with the flags is an error, as in
    HF Trainer, since DeepSpeed would silently use it."""
    *parents, key = dotted.split(".")
    node = config
    for part in parents:
        node = node.get(part)
        if not isinstance(node, dict):
            return
    current = node.get(key, "auto")
    if current == "auto":
        node[key] = value
    elif key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size") and current != value:
        raise UsageError(f"{path}: {dotted} is {current!r} but the flags give {value!r}; set it to \"auto\"")


def resolve_deepspeed_config(cfg, plan) -> dict:
    """Fill "auto" values from the flags, as HF Trainer does (transformers/integrations/deepspeed.py,
    HfTrainerDeepSpeedConfig.trainer_config_process and trainer_config_finalize)."""
    path = cfg.deepspeed
    config = load_deepspeed_json(path)
    hidden = plan.model.hf_config["hidden_size"]
    fills = {
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "train_batch_size": plan.global_batch,
        "gradient_clipping": cfg.max_grad_norm,
        "optimizer.params.lr": cfg.learning_rate,
        "optimizer.params.betas": [cfg.adam_beta1, cfg.adam_beta2],
        "optimizer.params.eps": cfg.adam_epsilon,
        "optimizer.params.weight_decay": cfg.weight_decay,
        "scheduler.params.warmup_min_lr": 0.0,
        "scheduler.params.warmup_max_lr": cfg.learning_rate,
        # DeepSpeed >= 0.17 rejects 0 warm-up steps; one step of warm-up is the nearest schedule it accepts.
        "scheduler.params.warmup_num_steps": max(1, plan.warmup_steps),
        "scheduler.params.total_num_steps": plan.total_steps,
        "bf16.enabled": cfg.bf16,
        "fp16.enabled": False,
        "zero_optimization.reduce_bucket_size": hidden * hidden,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden,
    }
    for dotted, value in fills.items():
        _fill(config, dotted, value, path)
    leftover = [key for key, value in _walk(config) if value == "auto"]
    if leftover:
        raise UsageError(f"{path}: cannot resolve \"auto\" for {', '.join(leftover)}")
    return config


def _walk(node: dict, prefix: str = ""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _walk(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def adapt_to_cpu(config: dict) -> list[str]:
    """Without an accelerator nothing can be pinned (FACTS.md); returns what was changed, for the results."""
    changed = []
    zero = config.get("zero_optimization", {})
    for section in ("offload_optimizer", "offload_param"):
        if zero.get(section, {}).get("pin_memory"):
            zero[section]["pin_memory"] = False
            changed.append(f"zero_optimization.{section}.pin_memory=false (no accelerator to pin for)")
    return changed


class ZeroStrategy:
    """deepspeed.initialize over a model whose parameters are partitioned as they are created
    (deepspeed.zero.Init), so no rank ever holds a whole copy."""

    def __init__(self, cfg, plan, device):
        import deepspeed
        import torch

        from .models import enable_checkpointing, llama_config

        deepspeed.init_distributed()  # adopts the process group the worker created
        self.config = plan.deepspeed_config
        from transformers import LlamaForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        # While this object lives, transformers builds models under deepspeed.zero.Init (parameters are
        # partitioned as they are created) and keeps the rotary buffers out of bf16, which a bare zero.Init
        # would cast them to.
        self._zero3_marker = HfDeepSpeedConfig(self.config)
        config = llama_config(plan.model, cfg.attn_implementation)
        torch.manual_seed(cfg.seed)
        if plan.model.weights_dir:
            model = LlamaForCausalLM.from_pretrained(plan.model.weights_dir, config=config)
        else:
            model = LlamaForCausalLM._from_config(config)
        if cfg.gradient_checkpointing:
            enable_checkpointing(model)
        scheduler = None
        if "scheduler" not in self.config:
            from .optim import linear_schedule

            def scheduler(optimizer):
                return linear_schedule(optimizer, plan)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=self.config,
            lr_scheduler=scheduler)
        self.model = self.engine.module
        self.gradient_bytes = 0

    def micro_step(self, batch: dict, last: bool):
        # DeepSpeed scales the loss by 1/accumulation and steps the optimizer at the boundary itself.
        loss = self.engine(**batch).loss
        self.engine.backward(loss)
        if not self.gradient_bytes and self.engine.is_gradient_accumulation_boundary():
            # What this rank holds of the gradients before the step (read once, for the planner's exact check:
            # the sizes do not change, and reading every step would put per-parameter calls on the clock).
            from deepspeed.utils import safe_get_local_grad

            self.gradient_bytes = sum(g.nbytes for g in map(safe_get_local_grad, self.model.parameters())
                                      if g is not None)
        self.engine.step()
        return loss.detach()

    def optimizer_step(self) -> None:
        pass

    def current_lr(self) -> float:
        return self.engine.get_lr()[0]

    def save(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder), tag="deepspeed", save_latest=False)

    def load(self, folder: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(folder), tag="deepspeed")
        if path is None:
            raise RuntimeError(f"{folder}: DeepSpeed found no checkpoint to load")

    def held_by_rank(self) -> dict:
        """Elements of each parameter this rank holds (its partition) against the whole parameter."""
        params = {name: {"local": p.ds_tensor.numel(), "global": p.ds_numel}
                  for name, p in self.model.named_parameters()}
        inner = getattr(self.engine.optimizer, "optimizer", None)
        state_bytes = sum(t.numel() * t.element_size() for state in getattr(inner, "state", {}).values()
                          for t in state.values() if hasattr(t, "numel") and t.dim() > 0)
        master_bytes = sum(t.nbytes for t in getattr(self.engine.optimizer, "fp32_partitioned_groups_flat", []))
        return {"parameters": params, "optimizer_state_bytes": state_bytes, "master_bytes": master_bytes,
                "gradient_bytes": self.gradient_bytes}
