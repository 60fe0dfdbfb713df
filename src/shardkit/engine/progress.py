"""Rank 0's progress: a live bar on a terminal, one plain line per --logging_steps otherwise (CI, logs)."""

from __future__ import annotations

import sys


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f} GiB"


class Progress:
    def __init__(self, total_steps: int, first_step: int, logging_steps: int, enabled: bool):
        self.enabled, self.logging_steps, self.total = enabled, logging_steps, total_steps
        self._bar = None
        if enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                     TextColumn("{task.fields[status]}"))
            self._task = self._bar.add_task("train", total=total_steps, completed=first_step, status="")
            self._bar.start()

    def update(self, step: int, loss: float, tokens_per_s: float, memory: dict) -> None:
        if not self.enabled:
            return
        mem = memory.get("gpu_reserved_bytes", memory.get("host_rss_peak_bytes"))
        status = f"loss {loss:.4f}  {tokens_per_s:,.0f} tok/s  mem {_gib(mem)}"
        if self._bar is not None:
            self._bar.update(self._task, completed=step, status=status)
        elif step % self.logging_steps == 0 or step == self.total:
            print(f"step {step}/{self.total}  {status}", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
