"""The planner's predictions as text, for a person (``shardkit plan`` without --json)."""

from __future__ import annotations

from . import memory_model as mm
from .predict import GIB, Prediction


def render(p: Prediction) -> str:
    """One prediction as text: every GPU term with its group, then the host terms, then the verdict."""
    lines = [f"{p.name or 'configuration'}  [{p.stack} stack: {mm.STACKS[p.stack]}]"]
    for t in sorted(p.terms, key=lambda t: (t.device != "gpu", mm.GROUPS.index(t.group))):
        when = {"layer": "in a layer's backward", "loss": "around the loss", "load": "while loading", None: ""}[t.phase]
        kind = "elastic" if t.kind == "elastic" else ""
        lines.append(f"  {t.device:4} {t.group:27} {t.bytes / GIB:8.2f} GiB  {t.name}"
                     + (f" ({', '.join(x for x in (when, kind) if x)})" if when or kind else ""))
    lines.append("  activations + loss at their peak, by choice: " + "; ".join(
        f"{label} {value / GIB:.1f} GiB" for label, value in p.activation_variants().items()))
    lines.append(f"  peak per GPU: live {p.live / GIB:.1f} GiB, with elastic {p.with_elastic / GIB:.1f} GiB "
                 "(elastic: all-gathers issued ahead, which the allocator takes only while the card has room)")
    lines.append(f"  => {p.summary()}")
    return "\n".join(lines)


def render_search(found: list[Prediction], model: str, gpus: int, gpu_memory: int, stack: str) -> str:
    fitting = sorted((p for p in found if p.verdict != "oom"), key=lambda p: -p.margin)
    lines = [f"{model} on {gpus} x {gpu_memory / GIB:.0f} GiB, {stack} stack: {len(fitting)} of {len(found)} "
             "configurations fit (live bytes within the card), largest margin first",
             f"  {'method':15} {'ckpt':5} {'batch':>5} {'accum':>5} {'peak GiB':>9} {'margin GiB':>10}  verdict"]
    for p in fitting:
        w = p.workload
        method = w.parallelism.label
        lines.append(f"  {method:15} {'yes' if w.grad_ckpt else 'no':5} {w.micro_batch:5d} {w.accumulation:5d} "
                     f"{p.live / GIB:9.1f} {p.margin / GIB:10.1f}  {p.verdict}"
                     + (f", host {p.host / GIB:.0f} GiB" if p.host else ""))
    return "\n".join(lines)
