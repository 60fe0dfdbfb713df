"""DeepSpeed's JIT-compiled ops, built by the launcher before the ranks start and before the run's clock
starts: once per Python environment, under a lock the kernel releases if the build is killed, with one line
while it compiles.

Left to the ranks, every rank of a first ZeRO-3 run compiled in silence inside its measured start-up, and a
build killed half-way (a time limit, Ctrl-C) left torch's own lock file behind, on which every later run
waited until its own limit. torch keys a build by its sources and flags, which name the environment's
DeepSpeed path, so two environments sharing one cache rebuilt each other's ops on every run: each
environment gets its own cache folder instead."""

from __future__ import annotations

import fcntl
import hashlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..spec.resolve import ResolvedRun


def extensions_dir() -> Path:
    """TORCH_EXTENSIONS_DIR when set, else one folder per environment under ~/.cache/shardkit (set for the
    ranks too, which inherit the launcher's environment)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    environment = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
    folder = Path.home() / ".cache" / "shardkit" / "torch_extensions" / environment
    os.environ["TORCH_EXTENSIONS_DIR"] = str(folder)
    return folder


def op_names(offload: bool) -> list[str]:
    """The ops a ZeRO-3 run loads: its optimizer (CPU Adam with offload, fused Adam without) and, on CPU
    ranks, DeepSpeed's shared-memory collectives."""
    from deepspeed.accelerator import get_accelerator

    names = ["CPUAdamBuilder" if offload else "FusedAdamBuilder"]
    if get_accelerator().device_name() == "cpu":
        names.append("ShareMemCommBuilder")
    return names


def prebuild(run: ResolvedRun) -> None:
    """Builds (or just loads) the ops the run's ranks will load; a no-op for FSDP."""
    if run.plan.parallelism.kind == "zero3":
        build_ops(op_names(run.plan.parallelism.offload))


def build_ops(names: list[str]) -> None:
    from deepspeed.accelerator import get_accelerator

    folder = extensions_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "shardkit-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another launcher building the same ops: wait for it
        for builder in map(get_accelerator().create_op_builder, names):
            if builder is None or not builder.is_compatible(verbose=False):
                continue
            build = folder / builder.name
            # Holding our lock, no shardkit build is running: torch's lock left here is a killed build's.
            (build / "lock").unlink(missing_ok=True)
            if not any(build.glob("*.so")):
                print(f"shardkit: compiling DeepSpeed's {builder.name} op into {build} (once per environment; "
                      "not part of the run's time)", file=sys.stderr, flush=True)
            try:
                builder.load(verbose=False)
            except Exception as error:  # the ranks will try again and report it as the run's error
                print(f"shardkit: building {builder.name} failed ({type(error).__name__}: "
                      f"{str(error).splitlines()[0] if str(error) else ''}); the ranks will try again",
                      file=sys.stderr, flush=True)
