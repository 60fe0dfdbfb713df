"""The memory planner: predicted peak memory per GPU for a recipe or any configuration, a verdict against
the card, the configurations that fit, and the calibration against the table (docs/planner.md).

Verdicts follow how PyTorch's caching allocator behaves: it keeps what it once reserved, so a run's
reported peak (nvidia-smi, the table's instrument) grows towards the card; when an allocation does not fit
it frees its cached blocks and retries before it gives up. So only the ``live`` bytes decide OOM; the
``elastic`` bytes (all-gathers issued ahead) only fill memory that is free. A run whose live bytes fit but
whose live + elastic bytes exceed the card is "at capacity": it runs, reported at the card's size, slowed
by the allocator's retries."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from itertools import product

from . import memory_model as mm
from .errors import UsageError
from .models import LLAMA1_COMMON, PRESETS, preset_name

GIB = 2**30
# An "80GB" A100 or H100 has 80 GiB (81,920 MiB): GPU vendors and nvidia-smi count in binary units.
DEFAULT_GPU_MEMORY = 80 * GIB
_UNITS = {"": 1, "b": 1, "kb": 2**10, "kib": 2**10, "mb": 2**20, "mib": 2**20, "gb": 2**30, "gib": 2**30,
          "tb": 2**40, "tib": 2**40}
BATCHES = (1, 2, 4, 8, 16, 32)
# Micro-batches per optimizer step when none is given: the seed's command lines (8 for FSDP, 2 for DeepSpeed).
SEED_ACCUMULATION = {"fsdp": 8, "zero3": 2}


def parse_size(text: str, flag: str) -> int:
    """'80GB', '80GiB', '81920MiB', '512GB' -> bytes. GB is read as GiB, as GPU vendors and nvidia-smi mean it."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise UsageError(f"{flag} {text!r}: expected a size such as 80GB, 80GiB or 81920MiB")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value <= 0:
        raise UsageError(f"{flag} {text!r}: must be more than 0 bytes")
    return int(value)


def _preset(model: str) -> dict:
    name = preset_name(model)
    if name is None:
        raise UsageError(f"unknown model {model!r}: the planner knows {', '.join(PRESETS)} "
                         "(and the seed's decapoda-research/llama-*-hf names)")
    return {**LLAMA1_COMMON, **PRESETS[name]}


def shape_of(model: str) -> mm.Shape:
    preset = _preset(model)
    return mm.Shape(hidden=preset["hidden_size"], intermediate=preset["intermediate_size"],
                    layers=preset["num_hidden_layers"], heads=preset["num_attention_heads"], vocab=preset["vocab_size"])


def seq_len_of(model: str) -> int:
    return _preset(model)["max_position_embeddings"]


def _check_gpus(gpus: int) -> None:
    if gpus < 1:
        raise UsageError(f"--gpus {gpus}: needs at least one GPU")


def workload(model: str, method: str, offload: bool, gpus: int, micro_batch: int, grad_ckpt: bool,
             accumulation: int | None = None, attention: str = "eager", seq_len: int | None = None) -> mm.Workload:
    _check_gpus(gpus)
    if micro_batch < 1:
        raise UsageError(f"batch {micro_batch}: needs at least one sequence per GPU")
    return mm.Workload(shape=shape_of(model), method=method, offload=offload, gpus=gpus, micro_batch=micro_batch,
                       seq_len=seq_len or seq_len_of(model), grad_ckpt=grad_ckpt,
                       accumulation=accumulation or SEED_ACCUMULATION[method], attention=attention)


def recipe_workload(recipe, gpus: int | None = None) -> mm.Workload:
    method = "zero3" if recipe.method.startswith("zero3") else "fsdp"
    attention = "eager" if recipe.attn == "eager" else "sdpa"
    return workload(recipe.model, method, recipe.method.endswith("offload"), recipe.gpus if gpus is None else gpus,
                    recipe.batch, recipe.grad_ckpt, recipe.accumulation, attention, recipe.seq_len)


@dataclass
class Prediction:
    name: str
    stack: str
    workload: mm.Workload
    gpu_memory: int
    host_memory: int | None
    terms: list[mm.Term] = field(default_factory=list)

    @property
    def live(self) -> int:
        return mm.peak(self.terms)

    @property
    def with_elastic(self) -> int:
        return mm.peak(self.terms, kinds=("live", "elastic"))

    @property
    def verdict(self) -> str:
        if self.live > self.gpu_memory:
            return "oom"
        return "at capacity" if self.with_elastic > self.gpu_memory else "fits"

    @property
    def reported(self) -> int | None:
        """What nvidia-smi would show at the peak: None when the run does not fit."""
        return None if self.verdict == "oom" else min(self.with_elastic, self.gpu_memory)

    @property
    def margin(self) -> int:
        """Card minus live bytes: negative is by how much it does not fit."""
        return self.gpu_memory - self.live

    @property
    def host(self) -> int:
        """Host memory on the node at its peak, loading or training: every rank's (all ranks on one node, as in
        the table). The optimizer's states exist only once training starts, after the load."""
        training = mm.peak([t for t in self.terms if t.phase != "load"], device="host")
        loading = sum(t.bytes for t in self.terms if t.device == "host" and t.phase == "load")
        return max(training, loading) * self.workload.gpus

    @property
    def host_pinned(self) -> int:
        return sum(t.bytes for t in self.terms if t.pinned) * self.workload.gpus

    @property
    def host_verdict(self) -> str | None:
        if self.host_memory is None:
            return None
        return "fits" if self.host <= self.host_memory else "oom"

    def by_group(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.terms:
            if t.device == "gpu":
                out[t.group] = out.get(t.group, 0) + t.bytes
        return out

    def activation_variants(self) -> dict[str, int]:
        """Peak activation + loss bytes of this run with and without checkpointing, eager and memory-efficient
        (SDPA) attention, everything else unchanged: what each choice would cost."""
        out = {}
        for ckpt, attention in product((True, False), ("eager", "sdpa")):
            w = replace(self.workload, grad_ckpt=ckpt, attention=attention)
            label = f"{'checkpointing' if ckpt else 'no checkpointing'}, {attention}"
            out[label] = mm.peak(mm.activation_terms(w, self.stack))
        return out

    def summary(self) -> str:
        w = self.workload
        label = (f"{w.method}{' + offload' if w.offload else ''}, {'' if w.grad_ckpt else 'no '}checkpointing, "
                 f"batch {w.micro_batch} x {w.accumulation} accumulation, {w.gpus} GPUs, {w.attention} attention")
        if self.verdict == "oom":
            verdict = f"OOM by {-self.margin / GIB:.1f} GiB"
        elif self.verdict == "at capacity":
            verdict = (f"fits at capacity: live {self.live / GIB:.1f} GiB, the caching allocator fills the card "
                       f"(margin {self.margin / GIB:.1f} GiB)")
        else:
            verdict = f"fits, margin {self.margin / GIB:.1f} GiB"
        host = f"; host {self.host / GIB:.0f} GiB ({self.host_pinned / GIB:.0f} pinned)" if self.host else ""
        if self.host_verdict == "oom":
            host += f" > --host-mem {self.host_memory / GIB:.0f} GiB: host OOM"
        return f"{label}: {verdict} on {self.gpu_memory / GIB:.0f} GiB{host}"

    def to_dict(self) -> dict:
        w = self.workload
        return {
            "name": self.name, "stack": self.stack, "stack_description": mm.STACKS[self.stack],
            "workload": {"hidden": w.shape.hidden, "intermediate": w.shape.intermediate, "layers": w.shape.layers,
                         "heads": w.shape.heads, "vocab": w.shape.vocab, "parameters": w.shape.params,
                         "method": w.method, "offload": w.offload, "gpus": w.gpus, "micro_batch": w.micro_batch,
                         "seq_len": w.seq_len, "grad_ckpt": w.grad_ckpt, "accumulation": w.accumulation,
                         "attention": w.attention},
            "gpu_memory_bytes": self.gpu_memory, "gpu_live_bytes": self.live,
            "gpu_with_elastic_bytes": self.with_elastic, "gpu_reported_bytes": self.reported,
            "verdict": self.verdict, "margin_bytes": self.margin,
            "host_bytes": self.host, "host_pinned_bytes": self.host_pinned, "host_memory_bytes": self.host_memory,
            "host_verdict": self.host_verdict,
            "terms": [t.to_dict() for t in self.terms],
            "activation_variants_bytes": self.activation_variants(),
        }


def predict(w: mm.Workload, stack: str = "today", gpu_memory: int = DEFAULT_GPU_MEMORY,
            host_memory: int | None = None, name: str = "") -> Prediction:
    if stack not in mm.STACKS:
        raise UsageError(f"--stack {stack!r}: one of {', '.join(mm.STACKS)}")
    return Prediction(name, stack, w, gpu_memory, host_memory, mm.terms(w, stack))


def predict_recipe(recipe, stack: str = "today", gpu_memory: int = DEFAULT_GPU_MEMORY,
                   host_memory: int | None = None, gpus: int | None = None) -> Prediction:
    return predict(recipe_workload(recipe, gpus), stack, gpu_memory, host_memory, recipe.name)


def search(model: str, gpus: int, gpu_memory: int = DEFAULT_GPU_MEMORY, stack: str = "today",
           global_batch: int | None = None, host_memory: int | None = None) -> list[Prediction]:
    """Every method x offload x checkpointing x batch on this many GPUs; the caller keeps what fits."""
    _check_gpus(gpus)
    if global_batch is not None and (global_batch < 1 or global_batch % gpus):
        raise UsageError(f"--global-batch {global_batch}: does not divide over {gpus} GPUs")
    out = []
    for method, offload, ckpt, batch in product(("fsdp", "zero3"), (False, True), (True, False), BATCHES):
        accumulation = None
        if global_batch is not None:
            if (global_batch // gpus) % batch:
                continue
            accumulation = global_batch // gpus // batch
        w = workload(model, method, offload, gpus, batch, ckpt, accumulation)
        label = f"{method}{'-offload' if offload else ''}_bs{batch}{'' if ckpt else '_nockpt'}"
        out.append(predict(w, stack, gpu_memory, host_memory, label))
    return out


def calibration(stack: str = "2023") -> list[dict]:
    """Each table row against its prediction on the table's card (A100 80GB), in the table's GB."""
    from . import recipes, reference

    rows = []
    for name, ref in reference.load_table().items():
        p = predict_recipe(recipes.load(name), stack, DEFAULT_GPU_MEMORY)
        predicted_gb = None if p.reported is None else p.reported / reference.BYTES_PER_TABLE_GB
        residual = None
        if ref.memory_gb is not None and predicted_gb is not None:
            residual = predicted_gb / ref.memory_gb - 1
        verdict_agrees = (p.verdict == "oom") == (ref.status == "oom")
        rows.append({"recipe": name, "row": ref.row, "table": ref.memory_printed, "table_gb": ref.memory_gb,
                     "verdict": p.verdict, "predicted_gb": predicted_gb,
                     "live_gb": p.live / reference.BYTES_PER_TABLE_GB,
                     "with_elastic_gb": p.with_elastic / reference.BYTES_PER_TABLE_GB,
                     "residual": residual, "verdict_agrees": verdict_agrees,
                     "within_20pct": residual is not None and abs(residual) <= 0.20})
    return rows


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
    lines.append(f"  peak per GPU: live {p.live / GIB:.1f} GiB, with elastic {p.with_elastic / GIB:.1f} GiB")
    lines.append(f"  => {p.summary()}")
    return "\n".join(lines)


def render_search(found: list[Prediction], model: str, gpus: int, gpu_memory: int, stack: str) -> str:
    fitting = sorted((p for p in found if p.verdict != "oom"), key=lambda p: -p.margin)
    lines = [f"{model} on {gpus} x {gpu_memory / GIB:.0f} GiB, {stack} stack: {len(fitting)} of {len(found)} "
             "configurations fit (live bytes within the card), largest margin first",
             f"  {'method':15} {'ckpt':5} {'batch':>5} {'accum':>5} {'peak GiB':>9} {'margin GiB':>10}  verdict"]
    for p in fitting:
        w = p.workload
        method = f"{w.method}{' + offload' if w.offload else ''}"
        lines.append(f"  {method:15} {'yes' if w.grad_ckpt else 'no':5} {w.micro_batch:5d} {w.accumulation:5d} "
                     f"{p.live / GIB:9.1f} {p.margin / GIB:10.1f}  {p.verdict}"
                     + (f", host {p.host / GIB:.0f} GiB" if p.host else ""))
    return "\n".join(lines)


def calibration_markdown(rows: list[dict]) -> str:
    head = ("| row | recipe | table | predicted (2023) | verdict | live | live + elastic | residual |\n"
            "| ---: | --- | ---: | ---: | --- | ---: | ---: | ---: |")
    body = []
    for r in rows:
        predicted = "OOM" if r["predicted_gb"] is None else f"{r['predicted_gb']:.1f} GB"
        residual = "" if r["residual"] is None else f"{r['residual']:+.0%}"
        mark = "" if r["verdict_agrees"] else " (wrong)"
        body.append(f"| {r['row']} | {r['recipe']} | {r['table']} | {predicted} | {r['verdict']}{mark} | "
                    f"{r['live_gb']:.1f} | {r['with_elastic_gb']:.1f} | {residual} |")
    return "\n".join([head, *body])


def calibration_figure(rows: list[dict], path) -> None:
    """Predicted against the table's figure, one point per row that ran; OOM rows marked on the x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 6))
    limit = 90
    ax.plot([0, limit], [0, limit], color="grey", lw=1)
    ax.fill_between([0, limit], [0, 0.8 * limit], [0, 1.2 * limit], color="grey", alpha=0.12, label="within 20%")
    for method, colour in (("fsdp", "tab:blue"), ("zero3", "tab:orange")):
        ran = [r for r in rows if r["table_gb"] is not None and method in r["recipe"]]
        ax.scatter([r["table_gb"] for r in ran], [r["predicted_gb"] or r["live_gb"] for r in ran], color=colour,
                   label=f"{method} rows")
    oom = [r for r in rows if r["table_gb"] is None]
    ax.scatter([limit - 2] * len(oom), [min(r["live_gb"], limit - 2) for r in oom], marker="x", color="red",
               label="table OOM (live bytes, capped)")
    ax.axhline(80 * GIB / 2**20 / 1000, color="red", lw=0.8, ls="--", label="80 GiB card")
    ax.set(xlim=(0, limit), ylim=(0, limit), xlabel="table GB", ylabel="planner GB (2023 stack)",
           title="Planner against the GPU Stats table")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
