"""DeepSpeed JSON configs: loading, checking against the run's parallel method, and HF Trainer's "auto"
resolution. Pure data: the engine (``engine/zero3.py``) only reads the resolved result."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UsageError


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


def resolve_deepspeed_config(cfg, plan, config: dict) -> dict:
    """Fill "auto" values of ``config`` (as loaded from --deepspeed) from the flags, as HF Trainer does
    (transformers/integrations/deepspeed.py, HfTrainerDeepSpeedConfig.trainer_config_process and
    trainer_config_finalize)."""
    path = cfg.deepspeed
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
    """Without an accelerator nothing can be pinned (DeepSpeed and torch fail "Cannot access accelerator device");
    returns what was changed, for the results."""
    changed = []
    zero = config.get("zero_optimization", {})
    for section in ("offload_optimizer", "offload_param"):
        if zero.get(section, {}).get("pin_memory"):
            zero[section]["pin_memory"] = False
            changed.append(f"zero_optimization.{section}.pin_memory=false (no accelerator to pin for)")
    return changed
