"""Checkpoint folders: written under a temporary name and renamed when complete, so an interrupted save
never looks like a checkpoint; the oldest are deleted beyond --save_total_limit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch.distributed as dist

from ..spec.resume import STATE_FILE, completed, find

__all__ = ["completed", "find", "restore", "save"]


def save(strategy, output_dir: str, step: int, position: dict, limit: int | None) -> Path:
    final = Path(output_dir) / f"checkpoint-{step}"
    staging = Path(output_dir) / f".checkpoint-{step}.partial"
    rank0 = dist.get_rank() == 0
    if rank0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    strategy.save(staging)
    dist.barrier()
    if rank0:
        (staging / STATE_FILE).write_text(json.dumps({"step": step, **position}))
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        if limit is not None:
            for old in completed(output_dir)[:-limit]:
                shutil.rmtree(old)
    dist.barrier()
    return final


def restore(strategy, folder: Path) -> dict:
    """Loads the strategy's state from a finished checkpoint; returns its position ({"step", "epoch"})."""
    strategy.load(folder)
    return json.loads((folder / STATE_FILE).read_text())
