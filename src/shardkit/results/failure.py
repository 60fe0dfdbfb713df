"""How a run failed, as the results file records it: one type that every failure path builds (a rank's
exception, a rank killed by a signal, a time limit, a container's ending)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

Kind = Literal["oom", "error", "timeout", "interrupted", "killed"]


@dataclass
class Failure:
    kind: Kind
    """oom: a GPU or host allocator refused, or the kernel's OOM killer struck (with its evidence); timeout: a
    time limit (a row's, or a collective waiting on a stalled peer) ended the run; interrupted: SIGINT or
    SIGTERM, or the launcher died; killed: SIGKILL with no evidence of the OOM killer; error: anything else."""
    message: str
    """One line: what happened."""
    rank: int | None = None
    """Global rank that failed first; None when no rank can be named."""
    step: int | None = None
    """Optimizer step in progress (1-based); None before training."""
    device: str | None = None
    """cuda, cpu or host for an OOM."""
    bytes_requested: int | None = None
    """The allocation that failed, when the allocator said."""
    traceback_file: str | None = None
    container_exit_code: int | None = None
    evidence: str | None = None
    """What the kind rests on beyond the exit code (the cgroup's OOM-kill count, a missing heartbeat)."""
    caused_by_peer: bool = False
    """This rank failed because another one did (a closed connection, a collective that timed out): a
    consequence, never the cause to report when the peer's own ending is known."""

    @property
    def status(self) -> str:
        """The results' status: the same word as the kind."""
        return self.kind

    def to_dict(self) -> dict:
        return asdict(self)
