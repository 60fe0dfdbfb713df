"""Which checkpoint a run resumes from: the folder rules, pure paths, so that a missing checkpoint is refused
when the run is resolved rather than inside every rank."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import UsageError

PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "shardkit_state.json"
# Written last, once every file of the checkpoint is in place (engine/checkpoints.py): its presence is
# what makes a folder a finished checkpoint.
MANIFEST = "manifest.json"


def completed(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    folder = Path(output_dir)
    found = [(int(m.group(1)), p) for p in folder.glob("checkpoint-*") if (m := PATTERN.match(p.name))
             and (p / MANIFEST).is_file()]
    return [p for _, p in sorted(found)]


def find(resume_from: str, output_dir: str) -> Path:
    """--resume_from_checkpoint: a folder, or "latest" for the newest finished one in --output_dir."""
    if resume_from == "latest":
        found = completed(output_dir)
        if not found:
            raise UsageError(f"--resume_from_checkpoint latest: no finished checkpoint in {output_dir!r}")
        return found[-1]
    folder = Path(resume_from)
    if not folder.is_dir():
        raise UsageError(f"--resume_from_checkpoint {resume_from!r}: no such folder")
    if not (folder / MANIFEST).is_file():
        raise UsageError(f"--resume_from_checkpoint {resume_from!r}: not a finished shardkit checkpoint "
                         f"(no {MANIFEST})")
    return folder


def run_identity(plan, stack: str) -> dict:
    """What a checkpoint holds the state of: its method, world size, model and stack. Another run cannot
    load it (shards of another world size or method, another model's parameters)."""
    return {"method": plan.parallelism.name, "world_size": plan.world_size, "model": plan.model.name,
            "stack": stack}


def _said(identity: dict) -> str:
    return (f"{identity['method']} on {identity['world_size']} ranks, model {identity['model']}, "
            f"{identity['stack']} stack")


def check_same_run(resume_from: str, output_dir: str, identity: dict) -> None:
    """A checkpoint of another method, world size, model or stack: one line naming both sides. Checkpoints
    written before they recorded it pass (their ranks' own loading decides)."""
    folder = find(resume_from, output_dir)
    try:
        saved = json.loads((folder / STATE_FILE).read_text()).get("run")
    except (OSError, ValueError):
        return  # the launcher's verification names a damaged checkpoint
    if saved and saved != identity:
        raise UsageError(f"--resume_from_checkpoint {resume_from}: a checkpoint of {_said(saved)}; this run is "
                         f"{_said(identity)}")


def check_resume(resume_from: str | None, output_dir: str, engine: str) -> None:
    if resume_from is None:
        return
    if engine == "native":
        find(resume_from, output_dir)
        return
    # HF Trainer writes and finds its own checkpoints: "latest" is its newest checkpoint-N folder.
    if resume_from == "latest":
        if not any(PATTERN.match(p.name) and p.is_dir() for p in Path(output_dir).glob("checkpoint-*")):
            raise UsageError(f"--resume_from_checkpoint latest: no checkpoint-N folder in {output_dir!r}")
    elif not Path(resume_from).is_dir():
        raise UsageError(f"--resume_from_checkpoint {resume_from!r}: no such folder")
