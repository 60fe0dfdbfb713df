"""DeepSpeed ZeRO-3 applied from outside the model: the strategy the training loop drives."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..spec.resolve import ResolvedRun


class ZeroStrategy:
    """deepspeed.initialize over a model whose parameters are partitioned as they are created
    (deepspeed.zero.Init), so no rank ever holds a whole copy."""

    def __init__(self, run: ResolvedRun, device):
        import deepspeed

        from .deepspeed_ops import init_distributed
        from .models import build_model, enable_checkpointing

        cfg, plan = run.config, run.plan
        init_distributed()  # adopts the process group the rank created
        self.config = plan.deepspeed_config
        from transformers.integrations import HfDeepSpeedConfig

        # While this object lives, transformers builds models under deepspeed.zero.Init (parameters are
        # partitioned as they are created) and keeps the rotary buffers out of bf16, which a bare zero.Init
        # would cast them to.
        self._zero3_marker = HfDeepSpeedConfig(self.config)
        model = build_model(plan.model, cfg.attn_implementation, cfg.seed)
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
        # The loop owns the accumulation boundary (DeepSpeed's documented override), so that the optimizer
        # steps in optimizer_step, once, as in every other strategy; DeepSpeed still scales the loss by
        # 1/accumulation and reduces the partitioned gradients at the boundary.
        self.engine.set_gradient_accumulation_boundary(last)
        loss = self.engine(**batch).loss
        self.engine.backward(loss)
        if not self.gradient_bytes and self.engine.is_gradient_accumulation_boundary():
            # What this rank holds of the gradients before the step (read once, for the planner's exact check:
            # the sizes do not change, and reading every step would put per-parameter calls on the clock).
            from deepspeed.utils import safe_get_local_grad

            self.gradient_bytes = sum(g.nbytes for g in map(safe_get_local_grad, self.model.parameters())
                                      if g is not None)
        return loss.detach()

    def optimizer_step(self) -> None:
        self.engine.step()  # clipping, the optimizer and the schedule, as configured in the resolved JSON

    def current_lr(self) -> float:
        return self.engine.get_lr()[0]

    def save(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder), tag="deepspeed", save_latest=False)

    def load(self, folder: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(folder), tag="deepspeed")
        if path is None:
            raise RuntimeError(f"{folder}: DeepSpeed found no checkpoint to load")

    def holdings(self) -> dict:
        """Elements of each parameter this rank holds (its partition) against the whole parameter."""
        params = {name: {"local": p.ds_tensor.numel(), "global": p.ds_numel}
                  for name, p in self.model.named_parameters()}
        inner = getattr(self.engine.optimizer, "optimizer", None)
        state_bytes = sum(t.numel() * t.element_size() for state in getattr(inner, "state", {}).values()
                          for t in state.values() if hasattr(t, "numel") and t.dim() > 0)
        master_bytes = sum(t.nbytes for t in getattr(self.engine.optimizer, "fp32_partitioned_groups_flat", []))
        return {"parameters": params, "optimizer_state_bytes": state_bytes, "master_bytes": master_bytes,
                "gradient_bytes": self.gradient_bytes}
