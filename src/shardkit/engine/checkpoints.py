"""Checkpoint folders: written under a temporary name and renamed when complete, so an interrupted save
never looks like a checkpoint; the oldest are deleted beyond --save_total_limit. Each carries a manifest
(every file's size and sha256, the step) written last: a resume verifies it before any rank starts, so a
changed or truncated file is a one-line error naming it, never a silent resume with wrong weights."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from ..errors import UsageError
from ..results.files import write_json_atomic
from ..spec.resume import MANIFEST, PATTERN, STATE_FILE, completed, find

__all__ = ["completed", "find", "restore", "save", "verify", "write_manifest"]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest_digest(body: dict) -> str:
    """A digest of the manifest's own content: an edited step or size is caught like an edited shard."""
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_manifest(folder: Path, step: int) -> None:
    files = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    body = {"step": step, "files": files}
    write_json_atomic(folder / MANIFEST, {**body, "digest": _manifest_digest(body)})


def verify(folder: Path) -> dict:
    """The checkpoint's position ({"step", "epoch"}) once every file matches the manifest; else UsageError
    naming the first file that does not."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        body = {"step": manifest["step"], "files": manifest["files"]}
        recorded_digest = manifest["digest"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"{folder / MANIFEST}: missing or unreadable: not a finished shardkit checkpoint") from None
    if _manifest_digest(body) != recorded_digest:
        raise UsageError(f"{folder / MANIFEST}: its content was changed after the checkpoint was written")
    match = PATTERN.match(folder.name)
    if match and int(match.group(1)) != body["step"]:
        raise UsageError(f"{folder}: the folder says step {match.group(1)}, its manifest step {body['step']}")
    for name, expected in body["files"].items():
        path = folder / name
        if not path.is_file():
            raise UsageError(f"{path}: missing from the checkpoint")
        if path.stat().st_size != expected["bytes"]:
            raise UsageError(f"{path}: {path.stat().st_size} bytes, the manifest says {expected['bytes']} (truncated "
                             "or replaced)")
        if _sha256(path) != expected["sha256"]:
            raise UsageError(f"{path}: sha256 differs from the manifest (the file changed after it was saved)")
    state = json.loads((folder / STATE_FILE).read_text())
    return {**state, "step": body["step"]}


def save(strategy, output_dir: str, step: int, position: dict, limit: int | None) -> Path:
    import torch.distributed as dist

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
        write_manifest(staging, step)
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        if limit is not None:
            for old in completed(output_dir)[:-limit]:
                shutil.rmtree(old)
    dist.barrier()
    return final


def restore(strategy, folder: Path) -> dict:
    """Loads the strategy's state from a checkpoint the launcher verified; returns its position."""
    strategy.load(folder)
    state = json.loads((folder / STATE_FILE).read_text())
    manifest = json.loads((folder / MANIFEST).read_text())
    state.pop("run", None)  # checked when the run was resolved
    return {**state, "step": manifest["step"]}
