"""What a run records as it trains, filled the same way by both engines (the native loop and HF Trainer's
callback), so a failure mid-run still leaves the steps done so far in the results."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Recorder:
    step_times_s: list[float] = field(default_factory=list)
    """Wall time of each optimizer step, the device synchronized at both ends (engine/measure.StepClock)."""
    loss: list[float] = field(default_factory=list)
    """Per optimizer step, averaged over ranks."""
    lr: list[float] = field(default_factory=list)
    checkpoint_s: list[float] = field(default_factory=list)
    """Seconds each checkpoint save took (outside the step times)."""
    first_step: int | None = None
    current_step: int | None = None
    """The step in progress, for a failure's report; None outside training."""
    resumed_from_step: int | None = None
    training_started_at: float | None = None
    cpu_adaptations: list[str] = field(default_factory=list)
    """Changes made to run on a machine without an accelerator (DeepSpeed's pinned buffers)."""
    on_step: Callable[[int], None] | None = field(default=None, repr=False)
    """Called with each finished step's number (the rank's heartbeat)."""

    def begin(self, finished_steps: int) -> None:
        """Training starts after ``finished_steps`` (0, or the step of the checkpoint resumed from)."""
        self.first_step = finished_steps + 1
        if finished_steps:
            self.resumed_from_step = finished_steps
        self.training_started_at = time.time()

    def logged(self, loss: float, lr: float) -> None:
        self.loss.append(loss)
        self.lr.append(lr)
        if self.on_step is not None:
            self.on_step(self.first_step + len(self.loss) - 1)

    def end(self) -> None:
        self.current_step = None
