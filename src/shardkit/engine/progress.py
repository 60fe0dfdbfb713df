"""Rank 0's progress: a live bar on a terminal, one plain line per --logging_steps otherwise (CI, logs). A
campaign reads the plain lines of the rows it runs (``StepRelay``) and shows them as its own live bar."""

from __future__ import annotations

import re
import sys

# The plain line's shape: what StepRelay parses.
STEP_LINE = re.compile(r"^step (\d+)/(\d+)  (.*)$")


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


class StepRelay:
    """In a campaign, a row's ranks write to a pipe, so they print plain step lines: shown as one live bar
    when the campaign's own console is a terminal (the lines still go to the row's log), passed through
    otherwise."""

    def __init__(self, title: str):
        self._bar = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn(title), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                     TextColumn("{task.fields[status]}"), console=Console(stderr=True))
            self._task = None

    def consumed(self, line: str) -> bool:
        """True when the line became the bar (and must not be echoed)."""
        match = STEP_LINE.match(line.rstrip("\n"))
        if self._bar is None or match is None:
            return False
        step, total, status = int(match.group(1)), int(match.group(2)), match.group(3)
        if self._task is None:
            self._bar.start()
            self._task = self._bar.add_task("", total=total, status=status)
        self._bar.update(self._task, completed=step, total=total, status=status)
        return True

    def close(self) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.stop()
