"""One row of a campaign: the recipe, its folder and the run it resolved to, and how its result is written
when something outside its ranks ends it. campaign.py owns rows (resolves, schedules, skips them);
containers.py only runs one; both use this module, neither the other."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..results.document import RESULTS_FILE
from ..results.failure import Failure
from ..results.files import read_json
from ..spec import recipes
from ..spec.resolve import ResolvedRun


@dataclass(frozen=True)
class Row:
    """One recipe to run: where its results go, what overrides it, and the run it resolved to (once)."""

    recipe: recipes.Recipe
    folder: Path
    overrides: tuple[str, ...]
    probe: int | None
    run: ResolvedRun



def record_failure(row: Row, failure: Failure, started: float | None = None) -> int:
    """The row's result when something outside its ranks ended it (a time limit, a container's end): the
    ranks' own results relabelled, with the steps they recorded, or a new one when they wrote none."""
    from ..engine.launch import write_failure
    from ..results.document import with_failure
    from ..results.files import write_json_atomic

    path = row.folder / RESULTS_FILE
    if path.is_file():
        recorded = read_json(path)
        failure.step = failure.step or (recorded.get("failure") or {}).get("step")
        document = with_failure(recorded, failure)
        write_json_atomic(path, document)
        return document["exit_code"]
    return write_failure(row.run, started or time.time(), failure)
