"""Turning an exception on one rank into a result: out of memory (GPU or host allocator) or error."""

from __future__ import annotations

import re

import torch

from ..results.failure import Failure

_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
# CUDA caching allocator: "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has ..."
_CUDA_ASK = re.compile(r"Tried to allocate ([\d.]+) (B|KiB|MiB|GiB|TiB)")
# CPU allocator: "DefaultCPUAllocator: can't allocate memory: you tried to allocate 4000 bytes"
_CPU_ASK = re.compile(r"can't allocate memory: you tried to allocate (\d+) bytes")
_OOM_TYPES = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                               getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    # The CPU allocator prefixes its message with an "[enforce fail at ...]" location.
    text = re.sub(r"^\[enforce fail at [^\]]*\]\s*(err == 0\.\s*)?", "", text)
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def classify(error: BaseException, rank: int, step: int | None) -> Failure:
    """An exception on one rank: out of memory (which allocator, how many bytes) or an error."""
    text = str(error)
    cuda = _CUDA_ASK.search(text)
    cpu = _CPU_ASK.search(text)
    is_oom = isinstance(error, _OOM_TYPES) or cuda is not None or cpu is not None or "out of memory" in text.lower()
    requested = None
    if cuda:
        requested = int(float(cuda.group(1)) * _UNITS[cuda.group(2)])
    elif cpu:
        requested = int(cpu.group(1))
    device = "cuda" if cuda or isinstance(error, _OOM_TYPES) and not cpu else ("cpu" if cpu else None)
    return Failure(kind="oom" if is_oom else "error", message=first_line(error), rank=rank, step=step,
                   device=device, bytes_requested=requested)


def describe_signal_death(exitcode: int, rank: int | None = None) -> Failure | None:
    """A worker killed by SIGKILL is what the host's OOM killer does (offloaded optimizer states live in host
    memory); the exit code alone cannot prove it was the OOM killer, so the message says so."""
    if exitcode == -9:
        return Failure(kind="oom", device="host", rank=rank,
                       message="killed by SIGKILL: the host OOM killer's signal (check dmesg)")
    if exitcode < 0:
        return Failure(kind="error", rank=rank, message=f"killed by signal {-exitcode}")
    return None
