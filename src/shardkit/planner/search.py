"""Every configuration of a model on a number of GPUs, predicted: what fits and how long each takes, for
``shardkit plan --model``."""

from __future__ import annotations

from itertools import product

from ..errors import UsageError
from ..spec.architecture import runs_on_2023_stack
from ..spec.parallelism import KINDS, Parallelism
from .hardware import REFERENCE, Hardware
from .predict import DEFAULT_GPU_MEMORY, Prediction, check_gpus, predict, shape_of, workload

BATCHES = (1, 2, 4, 8, 16, 32)


def search(model: str, gpus: int, gpu_memory: int = DEFAULT_GPU_MEMORY, stack: str = "today",
           global_batch: int | None = None, host_memory: int | None = None,
           hardware: Hardware = REFERENCE, seq_len: int | None = None, attention: str | None = None,
           beyond_context: bool = False, examples: int = 6000, allocator: str = "default") -> list[Prediction]:
    """Every method x offload x checkpointing x batch on this many GPUs, fastest predicted full run first;
    the caller keeps what fits (``ranked``). ``attention``: None is the stack's own (eager in 2023; SDPA
    today, where transformers runs the model with it)."""
    check_gpus(gpus)
    if global_batch is not None and (global_batch < 1 or global_batch % gpus):
        raise UsageError(f"--global-batch {global_batch}: does not divide over {gpus} GPUs")
    if global_batch is not None and global_batch > examples:
        raise UsageError(f"--global-batch {global_batch}: larger than the data set's {examples} sequences")
    if gpus > examples:
        raise UsageError(f"--gpus {gpus}: more GPUs than the {examples} sequences of the data set; every GPU "
                         "needs at least one")
    shape = shape_of(model)
    if stack == "2023" and not runs_on_2023_stack(shape):
        raise UsageError(f"--stack 2023: transformers 4.28 builds LLaMA-1 shapes only, not {model} "
                         f"({shape.model_type}, {shape.kv_heads} key-value heads)")
    if attention is None:
        attention = "sdpa" if stack == "today" and shape.sdpa else "eager"
    elif attention == "sdpa" and not shape.sdpa:
        raise UsageError(f"--attention sdpa: transformers runs {model} with eager attention only")
    out = []
    for kind, offload, ckpt, batch in product(KINDS, (False, True), (True, False), BATCHES):
        parallelism = Parallelism(kind, offload)
        accumulation = None
        if global_batch is not None:
            if (global_batch // gpus) % batch:
                continue
            accumulation = global_batch // gpus // batch
        elif gpus * batch * parallelism.seed_accumulation > examples:
            continue  # a step larger than the data set
        w = workload(model, parallelism, gpus, batch, ckpt, accumulation, attention, seq_len, beyond_context,
                     examples=examples, allocator=allocator)
        label = f"{parallelism.name.replace('_', '-')}_bs{batch}{'' if ckpt else '_nockpt'}"
        out.append(predict(w, stack, gpu_memory, host_memory, label, hardware))
    if not out:
        raise UsageError(f"no configuration of {gpus} GPUs fits a step in the data set's {examples} sequences "
                         f"(the smallest step: {gpus} GPUs x 1 sequence x the method's accumulation)")
    return sorted(out, key=lambda p: p.time.run_seconds)


def ranked(found: list[Prediction]) -> tuple[list[Prediction], list[Prediction]]:
    """What fits, fastest first, and the configurations predicted faster than the fastest that fits but
    rejected (each with its ``rejected`` reason)."""
    fitting = [p for p in found if p.rejected is None]
    fastest = fitting[0].time.run_seconds if fitting else float("inf")
    faster = [p for p in found if p.rejected is not None and p.time.run_seconds < fastest]
    return fitting, faster
