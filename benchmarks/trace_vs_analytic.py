"""The planner's analytic FSDP2 peak against its trace mode, for every dense catalogued model: 8 ranks,
micro-batch 1 and 2, sequence 2048 and 8192, full checkpointing, today's stack (SDPA where transformers runs
the model with it, else eager). Writes docs/planner-traces.json (the traces' figures, with the versions that
made them) and prints a markdown table; tests/test_models.py holds the analytic model to these traces.

    python benchmarks/trace_vs_analytic.py [--only SUBSTRING] [--out docs/planner-traces.json]
    python benchmarks/trace_vs_analytic.py --table    # the table again, from the traces written
    python benchmarks/trace_vs_analytic.py --live-at-peak MODEL MICRO_BATCH SEQ_LEN [--no-checkpointing]

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


def live_at_peak(model: str, micro_batch: int, seq_len: int, grad_ckpt: bool = True) -> None:
    import collections

    from shardkit import planner
    from shardkit.planner import memory_model, trace
    from shardkit.spec.architecture import architecture_of
    from shardkit.spec.parallelism import Parallelism
    from shardkit.spec.presets import ModelSpec, resolve_name

    name, config, _ = resolve_name(model)
    attention = "sdpa" if architecture_of(config, name).sdpa else "eager"
    events = trace.record_steps(ModelSpec(name, config, None), 8, micro_batch, seq_len, "today", attention,
                                grad_ckpt)
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
    w = planner.workload(name, Parallelism("fsdp", False), 8, micro_batch, grad_ckpt, 1, attention, seq_len,
                         beyond_context=True)
    for term in memory_model.terms(w, "today"):
        if term.device == "gpu" and term.kind == "live":
            print(f"  analytic {term.name:60s} {term.bytes / 2**30:8.3f} GiB  phase {term.phase or 'all'}")
    print(f"  analytic allocated {planner.predict(w, 'today').allocated / 2**30:.2f} GiB")


def table(traces: list[dict]) -> str:
    """docs/planner.md's table: allocated GiB, trace / analytic (the analytic's difference)."""
    from shardkit import planner
    from shardkit.spec.architecture import architecture_of
    from shardkit.spec.parallelism import Parallelism
    from shardkit.spec.presets import catalogue

    cells, slowest = {}, {}
    for t in traces:
        arch = architecture_of(catalogue()[t["model"]]["config"], t["model"])
        attention = "sdpa" if arch.sdpa else "eager"
        w = planner.workload(t["model"], Parallelism("fsdp", False), 8, t["micro_batch"], True, 1, attention,
                             t["seq_len"], beyond_context=True)
        analytic = planner.predict(w, "today").allocated
        cells[t["model"], t["micro_batch"], t["seq_len"]] = (
            f"{t['allocated'] / 2**30:.1f} / {analytic / 2**30:.1f} ({analytic / t['allocated'] - 1:+.1%})")
        slowest[t["model"]] = (attention, max(slowest.get(t["model"], ("", 0))[1], t["seconds"]))
    head = " | ".join(f"mb {b}, {s}" for b, s in CASES)
    lines = [f"| model | attention | {head} | slowest trace |", "| --- " * (len(CASES) + 3) + "|"]
    for model in [m for m in catalogue() if m in slowest]:
        attention, seconds = slowest[model]
        row = " | ".join(cells.get((model, b, s), "-") for b, s in CASES)
        lines.append(f"| {model} | {attention} | {row} | {seconds:.0f} s |")
    return "\n".join(lines)


def main() -> int:
    import torch
    import transformers

    from shardkit.spec.architecture import architecture_of
    from shardkit.spec.presets import catalogue

    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "planner-traces.json")
    parser.add_argument("--live-at-peak", nargs=3, metavar=("MODEL", "MICRO_BATCH", "SEQ_LEN"))
    parser.add_argument("--no-checkpointing", action="store_true", help="with --live-at-peak")
    parser.add_argument("--table", action="store_true", help="print the table of the traces in --out and stop")
    args = parser.parse_args()
    if args.no_checkpointing and not args.live_at_peak:
        parser.error("--no-checkpointing goes with --live-at-peak (the table's traces checkpoint every layer)")
    if args.live_at_peak:
        model, micro_batch, seq_len = args.live_at_peak
        live_at_peak(model, int(micro_batch), int(seq_len), not args.no_checkpointing)
        return 0
    previous = json.loads(args.out.read_text())["traces"] if args.out.exists() else []
    if args.table:
        print(table(previous))
        return 0
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
    print(table(list(done.values())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
