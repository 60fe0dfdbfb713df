"""The planner's predictions as text, for a person (``shardkit plan`` without --json)."""

from __future__ import annotations

from . import memory_model as mm
from . import time_model as tm
from .predict import GIB, Prediction
from .search import ranked


def render(p: Prediction) -> str:
    """One prediction as text: every GPU term with its group, then the host terms, then the verdict."""
    lines = [f"{p.name or 'configuration'}  [{p.stack} stack: {mm.STACKS[p.stack]}]"]
    for t in sorted(p.terms, key=lambda t: (t.device != "gpu", mm.GROUPS.index(t.group))):
        when = {"layer": "in a layer's backward", "loss": "around the loss", "root": "as the backward ends", "load": "while loading", None: ""}[t.phase]
        kind = {"elastic": "elastic", "reserve": "reserved, not allocated"}.get(t.kind, "")
        lines.append(f"  {t.device:4} {t.group:27} {t.bytes / GIB:8.2f} GiB  {t.name}"
                     + (f" ({', '.join(x for x in (when, kind) if x)})" if when or kind else ""))
    lines.append("  activations + loss at their peak, by choice: " + "; ".join(
        f"{label} {value / GIB:.1f} GiB" for label, value in p.activation_variants().items()))
    lines.append(f"  peak per GPU: allocated {p.allocated / GIB:.1f} GiB, reserved {p.reserved / GIB:.1f} GiB, "
                 f"nvidia-smi {p.nvidia_smi / GIB:.1f} GiB (reserved + CUDA context {p.context / GIB:.1f} GiB + "
                 f"communicator buffers {p.communicator / GIB:.1f} GiB, not modelled); uncertainty of the reserve "
                 f"{p.reserve_uncertainty / GIB:.1f} GiB (fragmentation, not modelled)")
    lines.append(f"  live {p.live / GIB:.1f} GiB decides OOM; reserved includes elastic bytes (all-gathers issued "
                 f"ahead, {(p.with_elastic - p.live) / GIB:.1f} GiB) the allocator takes only while the card has room")
    lines.append(f"  optimizer: {p.optimizer}")
    lines.append(f"  => {p.summary()}")
    lines += render_time(p)
    return "\n".join(lines + _inferred_note(p))


def render_time(p: Prediction) -> list[str]:
    """The time terms of one step, then the step, the run and the dominant term."""
    t, hw = p.time, p.hardware
    lines = [f"  time on {hw.card.name} in a {hw.host.name}, collectives over {hw.link}, per optimizer step "
             f"({p.workload.accumulation} micro-batches):"]
    for term in t.terms:
        amount = f"{term.amount / 1e12:.1f} TFLOP" if term.unit == "FLOP" else f"{term.amount / 1e9:.1f} GB"
        lines.append(f"  {term.group:16} {term.seconds:8.2f} s  {term.name}: {amount} over {term.resource} "
                     f"at {term.rate / 1e12 if term.unit == 'FLOP' else term.rate / 1e9:.1f} "
                     f"{'TFLOP/s' if term.unit == 'FLOP' else 'GB/s'} ({term.lane})")
    lines.append(f"  => {time_summary(p)}")
    return lines


def time_summary(p: Prediction) -> str:
    t = p.time
    note = "; at capacity: allocator retries would slow every step (not modelled)" if p.verdict == "at capacity" else ""
    return (f"step {t.step_seconds:.1f} s, {t.steps} steps, {t.saves} saves x {t.save_seconds:.0f} s, start-up "
            f"{t.startup_seconds:.0f} s: full run {tm.clock(t.run_seconds)}; dominant: {t.dominant}{note}")


def render_search(found: list[Prediction], model: str, gpus: int, gpu_memory: int, stack: str) -> str:
    """The configurations that fit, fastest predicted full run first, then the faster ones that do not fit."""
    fitting, faster = ranked(found)
    hw = found[0].hardware if found else None
    where = f" ({hw.card.name}, collectives over {hw.link})" if hw else ""
    lines = [f"{model} on {gpus} x {gpu_memory / GIB:.0f} GiB{where}, {stack} stack: {len(fitting)} of {len(found)} "
             "configurations fit, fastest predicted full run first",
             f"  {'method':15} {'ckpt':5} {'batch':>5} {'accum':>5} {'peak GiB':>9} {'margin GiB':>10} {'step s':>8} "
             f"{'full run':>10}  {'dominant':15} verdict"]
    for p in fitting:
        lines.append(_search_line(p) + f"  {p.verdict}" + (f", host {p.host / GIB:.0f} GiB" if p.host else ""))
    if faster:
        lines.append("Faster, but rejected:")
        lines += [_search_line(p) + f"  {p.rejected}" for p in faster]
    return "\n".join(lines + (_inferred_note(found[0]) if found else []))


def _inferred_note(p: Prediction) -> list[str]:
    shape = p.workload.shape
    if not shape.inferred:
        return []
    return [f"note: model_type {shape.model_type!r} has no rule in the planner's table: its shapes were read off "
            "the model transformers builds (parameter counts exact), its activation terms are LLaMA's layer's; "
            "--trace runs its real modelling code"]


def _search_line(p: Prediction) -> str:
    w, t = p.workload, p.time
    return (f"  {w.parallelism.label:15} {'yes' if w.grad_ckpt else 'no':5} {w.micro_batch:5d} {w.accumulation:5d} "
            f"{p.live / GIB:9.1f} {p.margin / GIB:10.1f} {t.step_seconds:8.1f} {tm.clock(t.run_seconds):>10}  "
            f"{t.dominant:15}")


def _size(value: int) -> str:
    return f"{value / GIB:.2f} GiB" if value >= GIB else f"{value / 2**20:.1f} MiB"


def render_trace(p: Prediction, t) -> str:
    """A trace's three figures beside the analytic ones (``t`` None: why there is none)."""
    w = p.workload
    if t is None:
        why = ("DeepSpeed ZeRO-3 cannot run on a fake process group" if w.method == "zero3"
               else "offloaded shards live in host memory, which the trace does not run")
        return f"trace of {p.name}: not run ({why}); the analytic figures stand"
    engine = "FSDP1" if p.stack == "2023" else "FSDP2"
    lines = [f"trace of {p.name}: {engine}, rank 0 of {w.gpus} on a fake process group, fake tensors, two steps "
             f"of {w.accumulation} micro-batch{'es' if w.accumulation > 1 else ''} "
             f"({t.seconds:.0f} s, host memory peak {t.host_peak_bytes / GIB:.1f} GiB)",
             f"  {'':12} {'analytic':>11} {'trace':>10} {'difference':>11}"]
    other = p.context + p.communicator
    for label, analytic, traced in (("allocated", p.allocated, t.allocated), ("reserved", p.reserved, t.reserved),
                                    ("nvidia-smi", p.nvidia_smi, t.reserved + other)):
        lines.append(f"  {label:12} {_size(analytic):>11} {_size(traced):>10} {100 * (analytic - traced) / traced:+10.1f}%")
    lines.append("  (the trace's nvidia-smi is its reserved plus the analytic CUDA context; it has no kernels' "
                 "workspaces and no communicator)")
    return "\n".join(lines)
