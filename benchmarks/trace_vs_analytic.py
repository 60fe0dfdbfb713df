"""The planner's analytic FSDP2 peak against its trace mode, for every dense catalogued model: 8 ranks,
micro-batch 1 and 2, sequence 2048 and 8192, full checkpointing, today's stack (SDPA where transformers runs
the model with it, else eager). Writes docs/planner-traces.json (the traces' figures, with the versions that
made them) and prints a markdown table; tests/test_models.py holds the analytic model to these traces.

    python benchmarks/trace_vs_analytic.py [--only SUBSTRING] [--out docs/planner-traces.json]
    python benchmarks/trace_vs_analytic.py --live-at-peak MODEL MICRO_BATCH SEQ_LEN

The second form prints one trace's live set at its peak (no allocator rounding), grouped by tensor size and
by the phase each tensor was made in, beside the analytic terms: how docs/planner.md breaks a difference down.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = [(1, 2048), (2, 2048), (1, 8192), (2, 8192)]


def one(model: str, micro_batch: int, seq_len: int) -> dict:
    """One trace in a fresh process: its host-memory peak is its own, and a fake process group of one world
    size does not leak into the next."""
    code = ("import json, sys; from shardkit.planner import trace; from shardkit.spec.presets import ModelSpec, "
            "resolve_name; from shardkit.spec.architecture import architecture_of; "
            f"n, c, _ = resolve_name({model!r}); a = architecture_of(c, n); "
            f"t = trace.trace(ModelSpec(n, c, None), 'fsdp', 8, {micro_batch}, {seq_len}, 'today', "
            "'sdpa' if a.sdpa else 'eager', True, False); "
            "print(json.dumps({'allocated': t.allocated, 'reserved': t.reserved, 'seconds': t.seconds, "
            "'host_peak_bytes': t.host_peak_bytes}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


PHASES = ["step 1 forward", "step 1 backward", "step 1 optimizer", "step 2 forward", "step 2 backward",
          "step 2 optimizer"]


def live_at_peak(model: str, micro_batch: int, seq_len: int) -> None:
    import collections

    from shardkit import planner
    from shardkit.planner import memory_model, trace
    from shardkit.spec.architecture import architecture_of
    from shardkit.spec.parallelism import Parallelism
    from shardkit.spec.presets import ModelSpec, resolve_name

    name, config, _ = resolve_name(model)
    attention = "sdpa" if architecture_of(config, name).sdpa else "eager"
    events = trace.record_steps(ModelSpec(name, config, None), 8, micro_batch, seq_len, "today", attention, True)
    live, born, total, peak, at_peak, marks = {}, {}, 0, 0, {}, 0
    for event in events:
        if event[0] == "mark":
            marks += 1
        elif event[0] == "alloc":
            live[event[1]], born[event[1]] = event[2], PHASES[marks]
            total += event[2]
        else:
            total -= live.pop(event[1], 0)
        if total > peak:
            peak, at_peak, peak_phase = total, dict(live), PHASES[marks]
    print(f"{model} mb{micro_batch} s{seq_len}: {peak / 2**30:.2f} GiB live at the peak, in {peak_phase}")
    groups = collections.Counter((size, born[key]) for key, size in at_peak.items())
    for (size, phase), count in sorted(groups.items(), key=lambda g: -g[0][0] * g[1]):
        if size * count >= 2**25:
            print(f"  {size / 2**20:10.2f} MiB x {count:4d} = {size * count / 2**30:7.3f} GiB  made in {phase}")
    w = planner.workload(name, Parallelism("fsdp", False), 8, micro_batch, True, 1, attention, seq_len,
                         beyond_context=True)
    for term in memory_model.terms(w, "today"):
        if term.device == "gpu" and term.kind == "live":
            print(f"  analytic {term.name:60s} {term.bytes / 2**30:8.3f} GiB  phase {term.phase or 'all'}")
    print(f"  analytic allocated {planner.predict(w, 'today').allocated / 2**30:.2f} GiB")


def main() -> int:
    import torch
    import transformers

    from shardkit.spec.architecture import architecture_of
    from shardkit.spec.presets import catalogue

    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "planner-traces.json")
    parser.add_argument("--live-at-peak", nargs=3, metavar=("MODEL", "MICRO_BATCH", "SEQ_LEN"))
    args = parser.parse_args()
    if args.live_at_peak:
        model, micro_batch, seq_len = args.live_at_peak
        live_at_peak(model, int(micro_batch), int(seq_len))
        return 0
    previous = json.loads(args.out.read_text())["traces"] if args.out.exists() else []
    done = {(t["model"], t["micro_batch"], t["seq_len"]): t for t in previous}
    dense = [h for h, e in catalogue().items() if not architecture_of(e["config"], h).moe and args.only in h]
    start = time.perf_counter()
    for i, model in enumerate(dense, start=1):
        for micro_batch, seq_len in CASES:
            figures = one(model, micro_batch, seq_len)
            done[(model, micro_batch, seq_len)] = {"model": model, "micro_batch": micro_batch, "seq_len": seq_len,
                                                   **figures}
            print(f"[{i}/{len(dense)} {time.perf_counter() - start:5.0f} s] {model} mb{micro_batch} s{seq_len}: "
                  f"allocated {figures['allocated'] / 2**30:.2f} GiB in {figures['seconds']:.0f} s", flush=True)
            document = {"about": "allocated and reserved peaks of rank 0 of 8 (FSDP2, full checkpointing, "
                                 "bf16 with fp32 reduce) by shardkit plan --trace; written by "
                                 "benchmarks/trace_vs_analytic.py",
                        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                     "python": platform.python_version(), "machine": platform.machine(),
                                     "cpus": __import__("os").cpu_count()},
                        "traces": sorted(done.values(), key=lambda t: (t["model"], t["seq_len"], t["micro_batch"]))}
            tmp = args.out.with_suffix(".tmp")
            tmp.write_text(json.dumps(document, indent=1) + "\n")
            tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
