"""Turning how a rank ended into a Failure: an exception (out of memory, an interruption, a peer that failed
first, an error), or a signal seen by the launcher, told apart from the OOM killer by the kernel's count."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import torch

from ..results.failure import Failure

_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
# CUDA caching allocator: "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has ..."
_CUDA_ASK = re.compile(r"Tried to allocate ([\d.]+) (B|KiB|MiB|GiB|TiB)")
# CPU allocator: "DefaultCPUAllocator: can't allocate memory: you tried to allocate 4000 bytes"
_CPU_ASK = re.compile(r"can't allocate memory: you tried to allocate (\d+) bytes")
# A rank whose peer died or stalled sees its collective fail: gloo's and NCCL's words for it.
_PEER_GONE = re.compile(r"Connection (closed|reset) by peer|Broken pipe|ECONNRESET|NCCL communicator was aborted",
                        re.IGNORECASE)
_TIMED_OUT = re.compile(r"Timed out waiting|timed out after|Watchdog caught collective operation timeout",
                        re.IGNORECASE)
_OOM_TYPES = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                               getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    # The CPU allocator prefixes its message with an "[enforce fail at ...]" location.
    text = re.sub(r"^\[enforce fail at [^\]]*\]\s*(err == 0\.\s*)?", "", text)
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


class Interrupted(BaseException):
    """SIGTERM or SIGHUP reached a rank (SIGINT arrives as KeyboardInterrupt): from a person, a closed
    terminal, a scheduler, the launcher
    ending the job, or the kernel because the launcher died (PR_SET_PDEATHSIG)."""

    def __init__(self, signum: int, launcher_gone: bool):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.launcher_gone = signum, launcher_gone


def classify(error: BaseException, rank: int, step: int | None) -> Failure:
    """An exception on one rank: out of memory (which allocator, how many bytes), an interruption, a peer
    that failed first, or an error."""
    if isinstance(error, (KeyboardInterrupt, Interrupted)):
        name = error.args[0] if isinstance(error, Interrupted) else "SIGINT"
        why = "its launcher is gone" if isinstance(error, Interrupted) and error.launcher_gone else "stopped"
        done = f"after {step - 1} finished steps" if step else "before training"
        return Failure(kind="interrupted", message=f"{name}: {why}, {done}", rank=rank, step=step)
    text = str(error)
    if _TIMED_OUT.search(text):
        return Failure(kind="timeout", rank=rank, step=step, caused_by_peer=True,
                       message=f"a collective waited past --collective_timeout_s: a peer stalled or died "
                               f"({first_line(error)})")
    if _PEER_GONE.search(text):
        return Failure(kind="error", rank=rank, step=step, caused_by_peer=True,
                       message=f"a peer left the job ({first_line(error)})")
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


def oom_kill_count() -> int | None:
    """How many processes the kernel's OOM killer has ended: this process's memory cgroup (v2, then v1), else
    the whole machine (/proc/vmstat); None where the kernel shows none of them."""
    sources = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":
                sources.append(Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.events")
            elif "memory" in controllers.split(","):
                sources.append(Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.oom_control")
    except OSError:
        pass
    for source in [*sources, Path("/proc/vmstat")]:
        try:
            for line in source.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            continue
    return None


def describe_signal_death(exitcode: int, rank: int | None = None, oom_kills: tuple[int | None, int | None] = (None, None),
                          step: int | None = None) -> Failure | None:
    """A rank ended by a signal. SIGKILL is the OOM killer's signal but also a person's kill -9 or a
    pre-emption: it counts as an OOM only when the kernel's OOM-kill count rose during the run."""
    if exitcode >= 0:
        return None
    name = signal.Signals(-exitcode).name if -exitcode in signal.valid_signals() else f"signal {-exitcode}"
    before, after = oom_kills
    if exitcode == -signal.SIGKILL:
        if before is not None and after is not None and after > before:
            return Failure(kind="oom", device="host", rank=rank, step=step,
                           message="killed by the kernel's OOM killer (SIGKILL)",
                           evidence=f"OOM kills counted by the kernel: {before} at launch, {after} after")
        return Failure(kind="killed", rank=rank, step=step, message="killed by SIGKILL",
                       evidence="no OOM kill counted by the kernel during the run" if after is not None
                       else "the kernel's OOM-kill count cannot be read here")
    if exitcode in (-signal.SIGTERM, -signal.SIGINT, -signal.SIGHUP):
        return Failure(kind="interrupted", rank=rank, step=step, message=f"ended by {name}")
    return Failure(kind="error", rank=rank, step=step, message=f"killed by {name}")
