"""The planner against measured peaks on one GPU (issue 5, points 6 and 7): each FSDP table row that today's
stack should fit, replayed as rank 0 of its N ranks with --fake_world N, plus the 7B-layer-shaped model
(8 layers) on real ranks of this one GPU. Writes planner_check.md and planner_check.json under --out.

    python benchmarks/planner_check.py --out /tmp/planner-check [--rows NAME ...] [--steps 2]

Memory only: a fake world's time is not the job's (docs/planner.md)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

from shardkit import planner, recipes, reference

GIB = 2**30


def fsdp_rows_that_fit() -> list[str]:
    names = []
    for name in reference.load_table():
        recipe = recipes.load(name)
        p = planner.predict_recipe(recipe, "today")
        # One rank's offloaded states must also fit this machine's host memory (128 GiB on the lent H100).
        if recipe.method.startswith("fsdp") and p.verdict != "oom" and p.host / recipe.gpus < 100 * GIB:
            names.append(name)
    return names


def run(name: str, out: Path, steps: int, extra: list[str]) -> dict:
    folder = out / name
    command = [sys.executable, "-m", "shardkit", "run", name, "--runner", "native", "--results", str(folder),
               "--max_steps", str(steps), "--save_strategy", "no", "--gradient_accumulation_steps", "2", *extra]
    done = subprocess.run(command, capture_output=True, text=True)
    (out / f"{name}.log").write_text(done.stdout + done.stderr)
    found = list(folder.rglob("results.json"))
    return json.loads(found[0].read_text()) if found else {"status": f"exit {done.returncode}"}


def measured(result: dict) -> dict:
    peaks = (result.get("memory") or {}).get("max_over_ranks") or {}
    return {k: peaks.get(k) for k in ("gpu_max_allocated_bytes", "gpu_max_reserved_bytes", "gpu_nvml_used_peak_bytes")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", nargs="*", default=None)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.rows or fsdp_rows_that_fit():
        recipe = recipes.load(name)
        prediction = planner.predict_recipe(recipe, "today")
        result = run(name, args.out, args.steps, ["--fake_world", str(recipe.gpus)])
        rows.append({"case": f"{name} (fake world {recipe.gpus})", "status": result.get("status"),
                     "predicted_live": prediction.live, **measured(result)})
        print(json.dumps(rows[-1]), flush=True)
    # The training core's 7B-layer-shaped model (8 decoder layers, batch 4) on one real rank of this GPU.
    recipe = recipes.load("llama-7b_fsdp_8gpu_bs4")
    shape = dataclasses.replace(planner.shape_of("llama-7b"), layers=8)
    prediction = planner.predict(dataclasses.replace(planner.recipe_workload(recipe, 1), shape=shape), "today")
    result = run(recipe.name, args.out / "layers8", args.steps, ["--num_hidden_layers", "8", "--nproc_per_node", "1"])
    rows.append({"case": "7B shapes, 8 layers, batch 4, 1 rank", "status": result.get("status"),
                 "predicted_live": prediction.live, **measured(result)})
    print(json.dumps(rows[-1]), flush=True)
    (args.out / "planner_check.json").write_text(json.dumps(rows, indent=1))
    lines = ["| case | status | planner live GiB | max allocated GiB | max reserved GiB | NVML used GiB |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        cells = [r["predicted_live"], r["gpu_max_allocated_bytes"], r["gpu_max_reserved_bytes"],
                 r["gpu_nvml_used_peak_bytes"]]
        lines.append(f"| {r['case']} | {r['status']} | " + " | ".join("" if c is None else f"{c / GIB:.1f}" for c in cells)
                     + " |")
    (args.out / "planner_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
