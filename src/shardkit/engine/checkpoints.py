"""Checkpoint folders: written under a temporary name and renamed when complete, so an interrupted save
never looks like a checkpoint; the oldest are deleted beyond --save_total_limit."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch.distributed as dist

from ..errors import UsageError

PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "shardkit_state.json"


def completed(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    folder = Path(output_dir)
    found = [(int(m.group(1)), p) for p in folder.glob("checkpoint-*") if (m := PATTERN.match(p.name))
             and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


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


def find(resume_from: str, output_dir: str) -> Path:
    """--resume_from_checkpoint: a folder, or "latest" for the newest finished one in --output_dir."""
    if resume_from == "latest":
        found = completed(output_dir)
        if not found:
            raise UsageError(f"--resume_from_checkpoint latest: no finished checkpoint in {output_dir!r}")
        return found[-1]
    folder = Path(resume_from)
    if not (folder / STATE_FILE).is_file():
        raise UsageError(f"--resume_from_checkpoint {resume_from!r}: not a finished shardkit checkpoint")
    return folder


def restore(strategy, folder: Path) -> dict:
    """Loads the strategy's state from a finished checkpoint; returns its position ({"step", "epoch"})."""
    strategy.load(folder)
    return json.loads((folder / STATE_FILE).read_text())
