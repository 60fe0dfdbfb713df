"""Results against the reference: one verdict per row.

Table rows compare peak GPU memory and wall time (normalized to the reference GPU); tiny CPU rows compare
their loss curve step by step with a real earlier run (recipes/reference_tiny.json)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import metrics
from .reference import REFERENCE_GPU, ReferenceRow
from .results import RESULTS_FILE, read_json

VERDICTS = {
    "reproduced": "within tolerance of the reference",
    "better": "less memory or faster than the reference, beyond tolerance",
    "worse": "more memory or slower than the reference, beyond tolerance",
    "oom-as-reference": "out of memory, as in the reference",
    "fits-where-reference-oom": "ran where the reference ran out of memory",
    "oom-where-reference-fit": "out of memory where the reference ran",
    "mismatch": "loss curve differs from the tiny reference beyond tolerance",
    "not-run": "no result for this row",
    "error": "the run failed",
}
FAILING = {"worse", "oom-where-reference-fit", "mismatch", "error"}
FAILING_STRICT = FAILING | {"better", "fits-where-reference-oom"}


@dataclass(frozen=True)
class Tolerances:
    """How far a measurement may be from its reference and still count as reproduced (docs/diff.md)."""

    memory_rel: float = 0.10
    """|measured / reference - 1| for peak GPU memory."""
    time_rel: float = 0.15
    """|normalized time / reference - 1|."""
    loss_abs: float = 1e-3
    """Per-step absolute loss difference for tiny CPU rows (fp32, same seed and data)."""


@dataclass
class Verdict:
    recipe: str
    verdict: str
    reason: str
    reference: dict = field(default_factory=dict)
    measured: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def load_results(paths: list[str | Path]) -> dict[str, dict]:
    """Results files or run folders -> {recipe name: results}; a run without a name is keyed by its folder."""
    found = {}
    for path in map(Path, paths):
        file = path / RESULTS_FILE if path.is_dir() else path
        if not file.is_file():
            continue
        document = read_json(file)
        found[document["run"].get("name") or file.parent.name] = document
    return found


def measured_memory(result: dict) -> tuple[float | None, str | None]:
    """Peak GPU memory in bytes, as nvidia-smi would show it (NVML) when sampled, else torch's reserved."""
    peaks = result["memory"]["max_over_ranks"]
    for key, label in (("gpu_nvml_used_peak_bytes", "nvml"), ("gpu_max_reserved_bytes", "torch_reserved")):
        if peaks.get(key):
            return peaks[key], label
    return None, None


def measured_time(result: dict) -> tuple[float | None, str]:
    if result["run"].get("probe"):
        projection = result["time"].get("projected_full_run")
        return (projection["wall_time_s"] if projection else None), "projected"
    return result["time"]["wall_time_s"], "wall"


def time_factor(result: dict) -> tuple[float | None, str]:
    """Multiply a run's time by this to express it on the reference GPU.

    Datasheet bf16 peak of the run's GPU over the reference GPU's (like for like); for a GPU missing from
    the peak table, the bf16 matmul rate the run measured at start over the reference's datasheet peak,
    which under-corrects by the achieved/peak ratio (about 0.8 on an H100, FACTS.md)."""
    reference_peak = metrics.peak_bf16_flops(REFERENCE_GPU)
    environment = result.get("environment") or {}
    gpu = environment.get("gpu")
    if not gpu:
        return None, "no GPU: time not normalized"
    peak = metrics.peak_bf16_flops(gpu["name"])
    if peak:
        return peak / reference_peak, f"datasheet bf16 peak {gpu['name']} / {REFERENCE_GPU}"
    rate = environment.get("matmul_bf16_flops")
    if rate:
        return rate / reference_peak, f"measured bf16 matmul rate / {REFERENCE_GPU} datasheet peak"
    return None, f"{gpu['name']}: no peak known and no measured rate: time not normalized"


def judge_table_row(ref: ReferenceRow, result: dict | None, tol: Tolerances, not_run_reason: str) -> Verdict:
    reference = {"memory_gb": ref.memory_gb, "memory_printed": ref.memory_printed, "time_s": ref.time_s,
                 "time_printed": ref.time_printed, "status": ref.status}
    if result is None:
        return Verdict(ref.recipe, "not-run", not_run_reason, reference)
    gpu = (result.get("environment") or {}).get("gpu") or {}
    measured = {"status": result["status"], "gpu": gpu.get("name"), "gpus": result["run"]["world_size"],
                "versions": (result.get("environment") or {}).get("versions")}
    if result["status"] == "error":
        return Verdict(ref.recipe, "error", result["failure"]["message"], reference, measured)
    if result["status"] == "oom":
        failure = result["failure"]
        where = f"rank {failure['rank']}, step {failure['step']}"
        if ref.status == "oom":
            return Verdict(ref.recipe, "oom-as-reference", where, reference, measured)
        return Verdict(ref.recipe, "oom-where-reference-fit", f"{where}; reference {ref.memory_printed}",
                       reference, measured)
    memory, memory_source = measured_memory(result)
    time_s, time_basis = measured_time(result)
    factor, normalization = time_factor(result)
    normalized = time_s * factor if time_s is not None and factor is not None else None
    measured.update(memory_gb=memory / 2**20 / 1000 if memory else None, memory_source=memory_source,
                    time_s=time_s, time_basis=time_basis, time_s_normalized=normalized,
                    normalization_factor=factor, normalization=normalization)
    if ref.status == "oom":
        return Verdict(ref.recipe, "fits-where-reference-oom", f"peak {measured['memory_gb']} GB", reference, measured)
    ratios = {}
    if memory is not None:
        ratios["memory"] = memory / ref.memory_bytes
    compared_time = normalized if normalized is not None else time_s
    if compared_time is not None:
        ratios["time"] = compared_time / ref.time_s
    measured["ratios"] = ratios
    limits = {"memory": tol.memory_rel, "time": tol.time_rel}
    worse = [f"{k} x{r:.2f}" for k, r in ratios.items() if r > 1 + limits[k]]
    better = [f"{k} x{r:.2f}" for k, r in ratios.items() if r < 1 - limits[k]]
    if not ratios:
        return Verdict(ref.recipe, "error", "no memory or time figure in the results", reference, measured)
    if worse:
        return Verdict(ref.recipe, "worse", ", ".join(worse + better), reference, measured)
    if better:
        return Verdict(ref.recipe, "better", ", ".join(better), reference, measured)
    return Verdict(ref.recipe, "reproduced", ", ".join(f"{k} x{r:.2f}" for k, r in ratios.items()),
                   reference, measured)


def judge_tiny_row(name: str, expected: dict, result: dict | None, tol: Tolerances, not_run_reason: str) -> Verdict:
    reference = {"loss": expected["loss"]}
    if result is None:
        return Verdict(name, "not-run", not_run_reason, reference)
    environment = result.get("environment") or {}
    time_s, time_basis = measured_time(result)
    measured = {"status": result["status"], "loss": result["loss"], "time_s": time_s, "time_basis": time_basis,
                "gpu": ((environment.get("gpu") or {}).get("name")) or environment.get("device"),
                "versions": environment.get("versions")}
    if result["status"] != "ok":
        return Verdict(name, "error", result["failure"]["message"], reference, measured)
    if len(result["loss"]) != len(expected["loss"]):
        return Verdict(name, "mismatch", f"{len(result['loss'])} steps, reference {len(expected['loss'])}",
                       reference, measured)
    gaps = [abs(a - b) for a, b in zip(result["loss"], expected["loss"], strict=True)]
    worst = max(range(len(gaps)), key=gaps.__getitem__)
    measured["max_loss_difference"] = gaps[worst]
    summary = f"largest loss difference {gaps[worst]:.2e} at step {worst + 1} (tolerance {tol.loss_abs:g})"
    return Verdict(name, "reproduced" if gaps[worst] <= tol.loss_abs else "mismatch", summary, reference, measured)


def compare(names: list[str], results: dict[str, dict], table: dict[str, ReferenceRow], tiny: dict,
            tol: Tolerances, not_run: dict[str, str] | None = None) -> list[Verdict]:
    not_run = not_run or {}
    verdicts = []
    for name in names:
        reason = not_run.get(name, "no results file")
        if name in table:
            verdicts.append(judge_table_row(table[name], results.get(name), tol, reason))
        elif name in tiny.get("runs", {}):
            verdicts.append(judge_tiny_row(name, tiny["runs"][name], results.get(name), tol, reason))
        else:
            verdicts.append(Verdict(name, "error", "no reference row for this recipe"))
    return verdicts


def exit_code(verdicts: list[Verdict], strict: bool) -> int:
    failing = FAILING_STRICT if strict else FAILING
    return 1 if any(v.verdict in failing for v in verdicts) else 0
