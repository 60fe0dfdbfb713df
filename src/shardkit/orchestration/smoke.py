"""The kit's main job on its embedded default, for a machine without a GPU: the tiny recipes (all four
methods, 2 CPU ranks), diffed against the loss curves of an earlier real run, and the report."""

from __future__ import annotations

import datetime
import platform
import sys
from pathlib import Path

from ..engine.environment import git_commit
from ..results.files import write_json_atomic
from ..spec import recipes, reference
from ..verdict import diff, report
from . import campaign

TINY = ["tiny_fsdp_2cpu_bs4", "tiny_fsdp-offload_2cpu_bs4", "tiny_zero3_2cpu_bs4", "tiny_zero3-offload_2cpu_bs4"]


def _update_reference(folders: dict[str, Path], found: dict[str, dict]) -> None:
    failed = [name for name in TINY if found.get(name, {}).get("status") != "ok"]
    if failed:
        raise SystemExit(f"shardkit: not updating the reference: {', '.join(failed)} did not finish ok")
    any_run = found[TINY[0]]
    document = {
        "provenance": {
            "what": "loss per optimizer step of the tiny recipes (fp32, 2 CPU ranks over gloo)",
            "command": "nox -s smoke -- --update-reference",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": {"machine": platform.machine(), "processor": platform.processor(),
                     "cpu_count": any_run["environment"]["cpu_count"]},
            "versions": any_run["environment"]["versions"], "python": any_run["environment"]["python"],
            "git_commit": git_commit(),
        },
        "runs": {name: {"loss": found[name]["loss"], "data_fingerprint": found[name]["data"]["fingerprint"],
                        "steps": len(found[name]["loss"])} for name in TINY},
    }
    path = recipes.RECIPES_DIR / "reference_tiny.json"
    write_json_atomic(path, document)
    print(f"wrote {path}", file=sys.stderr)


def smoke(root: Path, update_reference: bool) -> int:
    folders, not_run = campaign.reproduce(TINY, root, probe=None, force=True, timeout_s=900, overrides=[])
    found = diff.load_results(list(folders.values()))
    if update_reference:
        _update_reference(folders, found)
    tiny = reference.load_tiny()
    verdicts = diff.compare(TINY, found, reference.load_table(), tiny, diff.Tolerances(), not_run)
    paths = report.write(verdicts, root)
    for v in verdicts:
        print(f"{v.recipe:<28} {v.verdict:<12} {v.reason}")
    print(f"report: {', '.join(str(p) for p in paths.values())}")
    return diff.exit_code(verdicts, strict=False)
