"""How a run failed, as the results file records it: one type that every failure path builds (a rank's
exception, a rank killed by a signal, a time limit, a container's ending)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

Kind = Literal["oom", "error"]


@dataclass
class Failure:
    kind: Kind
    """oom (GPU or host allocator, the kernel's OOM killer) or error."""
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

    @property
    def status(self) -> str:
        return "oom" if self.kind == "oom" else "error"

    def to_dict(self) -> dict:
        return asdict(self)
