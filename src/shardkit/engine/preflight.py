"""Checks of a resolved run that depend on this machine and its files (installed libraries, devices, a
checkpoint to resume), made before any process starts, as one line."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..spec.resolve import ResolvedRun


def check_engine(run: ResolvedRun) -> None:
    cfg = run.config
    if run.plan.engine == "hf":
        from .hf_trainer import check_supported

        check_supported(run.plan)
    elif cfg.resume_from_checkpoint:
        from . import checkpoints

        checkpoints.verify(checkpoints.find(cfg.resume_from_checkpoint, cfg.output_dir))
