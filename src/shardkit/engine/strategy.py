"""The contract between the training loop and a parallel method: what the loop drives, what it reads back.

FSDP2 (``fsdp.py``), the 2023 stack's FSDP1 (``fsdp1.py``) and DeepSpeed ZeRO-3 (``zero3.py``) implement
it; the loop (``loop.py``) knows no other. HF Trainer (``hf_trainer.py``) runs its own loop and fills the same
recorder instead."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from ..spec.resolve import ResolvedRun


class Strategy(Protocol):
    model: torch.nn.Module

    def micro_step(self, batch: dict, last: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch; ``last``: the final micro-batch before the optimizer step.
        Returns the detached, unscaled loss."""

    def optimizer_step(self) -> None:
        """Clip, step the optimizer and the learning-rate schedule, clear gradients."""

    def current_lr(self) -> float: ...

    def save(self, folder: Path) -> None:
        """This rank's share of model, optimizer and schedule (every rank calls it)."""

    def load(self, folder: Path) -> None: ...

    def holdings(self) -> dict:
        """What this rank holds: {"parameters": {name: {"local", "global"}}, "optimizer_state_bytes",
        "gradient_bytes", "master_bytes"?, "unsharded_gradient_bytes"?, "load_copy_bytes"?}; the planner's
        exact checks read it (sharding.json)."""


def build_strategy(run: ResolvedRun, device: torch.device) -> Strategy:
    """The native engine's strategy for the run's parallel method; each module is imported only when used
    (FSDP2 needs a newer torch than the 2023 stack's, DeepSpeed may not be installed)."""
    if run.plan.parallelism.kind == "zero3":
        from .zero3 import ZeroStrategy

        return ZeroStrategy(run, device)
    if run.plan.stack == "2023":
        from .fsdp1 import Fsdp1Strategy

        return Fsdp1Strategy(run, device)
    from .fsdp import FsdpStrategy

    return FsdpStrategy(run, device)
