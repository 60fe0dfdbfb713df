"""Results against the reference: one verdict per row.

Table rows compare peak GPU memory and wall time (normalized to the reference GPU); tiny CPU rows compare
their loss curve step by step with a real earlier run (recipes/reference_tiny.json)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UsageError
from ..results import metrics
from ..results.document import RESULTS_FILE, read_results
from ..spec.reference import BYTES_PER_TABLE_GB, REFERENCE_GPU, REFERENCE_GPU_MEMORY_GB, ReferenceRow

# Rows printed within 5% of the card (78-81 GB on an 80 GiB A100) are at capacity: the caching allocator
# grew to fill the card, so the figure is a ceiling, not what the run needed (docs/planner.md).
AT_CAPACITY = 0.95 * REFERENCE_GPU_MEMORY_GB
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
    predicted: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def results_files(paths: list[str | Path]) -> list[Path]:
    """The results files named, and every results.json in or below the folders named."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(path.rglob(RESULTS_FILE))
        elif path.exists():
            files.append(path)
        else:
            raise UsageError(f"{path}: no such file or folder")
    return files


def result_key(recipe: str, stack: str) -> str:
    """How a row's result is named among others: the recipe for today's stack, ``recipe@stack`` for the
    period stack and the 2023 emulation, so that one diff holds a row's runs on every stack side by side."""
    return recipe if stack == "today" else f"{recipe}@{stack}"


def load_results(paths: list[str | Path]) -> dict[str, dict]:
    """Results files or run folders (a folder without results is a row that did not run) -> {result_key:
    results}; a run without a name is keyed by its folder. Two results for one recipe on one stack are
    refused: which one the verdict is about would be left to the order of the paths."""
    found, sources = {}, {}
    for path in map(Path, paths):
        file = path / RESULTS_FILE if path.is_dir() else path
        if not file.is_file():
            continue
        document = read_results(file)
        key = result_key(document["run"].get("name") or file.parent.name, run_stack(document))
        if key in found:
            raise UsageError(f"{file}: a second result for {key} (the first: {sources[key]}); diff the folder of "
                             "one of them")
        found[key], sources[key] = document, file
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
    which under-corrects by the achieved/peak ratio (a bf16 matmul reached 780-787 of the 989 TFLOP/s
    datasheet peak on an H100, about 0.8)."""
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


def stack_of(result: dict | None) -> str:
    """The planner's stack for a run, so that a run is compared with the prediction for the software it ran:
    the period stack and the 2023 emulation are the table's (2023), the rest today's. Results before schema
    3 have no ``run.stack``: torch before 2.1 (FSDP1, no all-gather limit) is the table's."""
    return "today" if run_stack(result) == "today" else "2023"


def run_stack(result: dict | None) -> str:
    """period, 2023-emulated or today: torch's version says period (schema 3's ``run.stack`` says it too, and
    older results have no ``run.stack``), ``run.stack`` the rest."""
    from ..results.document import stack_label

    result = result or {}
    emulated = (result.get("run") or {}).get("stack") == "2023-emulated"
    return stack_label("2023" if emulated else "today", (result.get("environment") or {}).get("versions"))


def predicted(ref: ReferenceRow, result: dict | None) -> dict:
    """The planner's figures for this row: memory on the run's GPU, time on the run's card at the matmul rate
    the run measured (the table's machine when there is no run or the card is unknown)."""
    from ..planner import DEFAULT_GPU_MEMORY, REFERENCE, hardware_for, predict_recipe
    from ..spec.recipes import load_recipe

    environment = (result or {}).get("environment") or {}
    gpu = environment.get("gpu") or {}
    hardware = hardware_for(gpu.get("name"), environment.get("matmul_bf16_flops")) or REFERENCE
    p = predict_recipe(load_recipe(ref.recipe), stack_of(result), gpu.get("memory_bytes") or DEFAULT_GPU_MEMORY,
                       hardware=hardware, allocator=allocator_of(environment))
    return {"stack": p.stack, "verdict": p.verdict, "live_gb": p.live / BYTES_PER_TABLE_GB,
            "memory_gb": None if p.reported is None else p.reported / BYTES_PER_TABLE_GB,
            "time_s": p.time.run_seconds, "step_s": p.time.step_seconds, "dominant": p.time.dominant,
            "card": hardware.card.name, "matmul_flops": hardware.matmul_flops}


def allocator_of(environment: dict) -> str:
    """The caching allocator a run used, from the configuration its results recorded (older results, and the
    2023 stack's, have none: torch's default)."""
    conf = (environment.get("allocator_conf") or "").replace(" ", "").lower()
    return "expandable" if "expandable_segments:true" in conf else "default"


def judge_table_row(ref: ReferenceRow, result: dict | None, tol: Tolerances, not_run_reason: str) -> Verdict:
    verdict = _judge_table_row(ref, result, tol, not_run_reason)
    verdict.predicted = predicted(ref, result)
    if ref.time_s and "time" not in verdict.measured.get("ratios", {}):
        # No measured time to judge (a row not run, a fake world, a probe without a projection): the planner's
        # figure stands in, labelled, and is not judged.
        from ..planner.time_model import clock

        seconds = verdict.predicted["time_s"]
        if verdict.measured.get("time_s") is None:
            verdict.measured["time_basis"] = "predicted"
        verdict.reason += (f"{'; ' if verdict.reason else ''}time not measured: the planner predicts "
                           f"{clock(seconds)} on {verdict.predicted['card']} ({verdict.predicted['stack']} stack; "
                           f"table {ref.time_printed}, x{seconds / ref.time_s:.2f})")
    return verdict


def _judge_table_row(ref: ReferenceRow, result: dict | None, tol: Tolerances, not_run_reason: str) -> Verdict:
    reference = {"memory_gb": ref.memory_gb, "memory_printed": ref.memory_printed, "time_s": ref.time_s,
                 "time_printed": ref.time_printed, "status": ref.status}
    if result is None:
        return Verdict(ref.recipe, "not-run", not_run_reason, reference)
    gpu = (result.get("environment") or {}).get("gpu") or {}
    measured = {"status": result["status"], "gpu": gpu.get("name"), "gpus": result["run"]["world_size"],
                "versions": (result.get("environment") or {}).get("versions"), "stack": run_stack(result)}
    if result["status"] not in ("ok", "oom"):  # error, timeout, interrupted, killed: no figure to judge
        return Verdict(ref.recipe, "error", f"{result['status']}: {result['failure']['message']}", reference,
                       measured)
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
    ratios, notes = {}, []
    if memory is not None:
        ratios["memory"] = memory / ref.memory_bytes
    compared_time = normalized if normalized is not None else time_s
    if result["run"].get("fake_world"):
        notes.append(f"fake world of {result['run']['fake_world']}: memory only, its time is not the job's")
    elif compared_time is not None:
        ratios["time"] = compared_time / ref.time_s
    measured["ratios"] = ratios
    limits = {"memory": tol.memory_rel, "time": tol.time_rel}
    worse = [f"{k} x{r:.2f}" for k, r in ratios.items() if r > 1 + limits[k]]
    better = [f"{k} x{r:.2f}" for k, r in ratios.items() if r < 1 - limits[k]]
    if ref.memory_gb >= AT_CAPACITY and "memory" in ratios and ratios["memory"] < 1 - limits["memory"]:
        # Less than a full card is not "better" than a figure that only says the card was full.
        better = [b for b in better if not b.startswith("memory")]
        notes.append(f"reference {ref.memory_printed} is at capacity: memory x{ratios['memory']:.2f} not judged")
    if not ratios:
        return Verdict(ref.recipe, "error", "no memory or time figure in the results", reference, measured)
    if worse:
        verdict, shown = "worse", worse + better
    elif better:
        verdict, shown = "better", better
    else:
        verdict, shown = "reproduced", [f"{k} x{r:.2f}" for k, r in ratios.items()]
    return Verdict(ref.recipe, verdict, "; ".join([", ".join(shown), *notes]), reference, measured)


def judge_tiny_row(name: str, expected: dict, result: dict | None, tol: Tolerances, not_run_reason: str) -> Verdict:
    reference = {"loss": expected["loss"]}
    if result is None:
        return Verdict(name, "not-run", not_run_reason, reference)
    environment = result.get("environment") or {}
    time_s, time_basis = measured_time(result)
    measured = {"status": result["status"], "loss": result["loss"], "time_s": time_s, "time_basis": time_basis,
                "gpu": ((environment.get("gpu") or {}).get("name")) or environment.get("device"),
                "versions": environment.get("versions"), "stack": run_stack(result)}
    if result["status"] != "ok":
        return Verdict(name, "error", f"{result['status']}: {result['failure']['message']}", reference, measured)
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
    """One verdict per name (a result_key: a recipe, or recipe@stack); a table row is judged against the
    table on whichever stack it ran (the planner's figures follow the stack), a tiny row only on today's,
    the stack its reference curves were recorded on."""
    not_run = not_run or {}
    verdicts = []
    for name in names:
        reason = not_run.get(name, "no results file")
        recipe, _, stack = name.partition("@")
        if recipe in table:
            verdicts.append(judge_table_row(table[recipe], results.get(name), tol, reason))
            verdicts[-1].recipe = name  # the report's row, with its stack when not today's
        elif recipe in tiny.get("runs", {}) and not stack:
            verdicts.append(judge_tiny_row(name, tiny["runs"][name], results.get(name), tol, reason))
        elif recipe in tiny.get("runs", {}):
            verdicts.append(Verdict(name, "error", f"no reference curve for the {stack} stack: the tiny references "
                                                   "were recorded on today's"))
        else:
            verdicts.append(Verdict(name, "error", "no reference row for this recipe"))
    return verdicts


def exit_code(verdicts: list[Verdict], strict: bool) -> int:
    failing = FAILING_STRICT if strict else FAILING
    return 1 if any(v.verdict in failing for v in verdicts) else 0
