"""Every configuration of a model on a number of GPUs, predicted: what fits and how long each takes, for
``shardkit plan --model``."""

from __future__ import annotations

from itertools import product

from ..errors import UsageError
from ..spec.parallelism import KINDS, Parallelism
from .hardware import REFERENCE, Hardware
from .predict import DEFAULT_GPU_MEMORY, Prediction, check_gpus, predict, workload

BATCHES = (1, 2, 4, 8, 16, 32)


def search(model: str, gpus: int, gpu_memory: int = DEFAULT_GPU_MEMORY, stack: str = "today",
           global_batch: int | None = None, host_memory: int | None = None,
           hardware: Hardware = REFERENCE) -> list[Prediction]:
    """Every method x offload x checkpointing x batch on this many GPUs, fastest predicted full run first;
    the caller keeps what fits (``ranked``)."""
    check_gpus(gpus)
    if global_batch is not None and (global_batch < 1 or global_batch % gpus):
        raise UsageError(f"--global-batch {global_batch}: does not divide over {gpus} GPUs")
    out = []
    for kind, offload, ckpt, batch in product(KINDS, (False, True), (True, False), BATCHES):
        parallelism = Parallelism(kind, offload)
        accumulation = None
        if global_batch is not None:
            if (global_batch // gpus) % batch:
                continue
            accumulation = global_batch // gpus // batch
        w = workload(model, parallelism, gpus, batch, ckpt, accumulation)
        label = f"{parallelism.name.replace('_', '-')}_bs{batch}{'' if ckpt else '_nockpt'}"
        out.append(predict(w, stack, gpu_memory, host_memory, label, hardware))
    return sorted(out, key=lambda p: p.time.run_seconds)


def ranked(found: list[Prediction]) -> tuple[list[Prediction], list[Prediction]]:
    """What fits, fastest first, and the configurations predicted faster than the fastest that fits but
    rejected (each with its ``rejected`` reason)."""
    fitting = [p for p in found if p.rejected is None]
    fastest = fitting[0].time.run_seconds if fitting else float("inf")
    faster = [p for p in found if p.rejected is not None and p.time.run_seconds < fastest]
    return fitting, faster
