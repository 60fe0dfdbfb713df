"""Checks of a resolved run that depend on this machine's engine (installed libraries, devices), made
before any process starts, as one line."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..spec.resolve import ResolvedRun


def check_engine(run: ResolvedRun) -> None:
    if run.plan.engine == "hf":
        from .hf_trainer import check_supported

        check_supported(run.plan)
