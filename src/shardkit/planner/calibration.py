"""The planner against the table: each row's prediction on the table's card, memory and time, with
residuals, as rows, Markdown tables and figures (``shardkit plan --calibration``)."""

from __future__ import annotations

from ..spec import reference
from ..spec.recipes import load_recipe
from . import time_model as tm
from .predict import DEFAULT_GPU_MEMORY, GIB, predict_recipe

# A time cell counts as predicted when the planner is within this of it (the acceptance bar for time).
TIME_TOLERANCE = 0.25


def calibration(stack: str = "2023") -> list[dict]:
    """Each table row against its prediction on the table's machine (A100 80GB in a DGX A100, hardware.py):
    memory in the table's GB, time in seconds for the whole run."""
    rows = []
    for name, ref in reference.load_table().items():
        p = predict_recipe(load_recipe(name), stack, DEFAULT_GPU_MEMORY)
        predicted_gb = None if p.reported is None else p.reported / reference.BYTES_PER_TABLE_GB
        residual = None
        if ref.memory_gb is not None and predicted_gb is not None:
            residual = predicted_gb / ref.memory_gb - 1
        verdict_agrees = (p.verdict == "oom") == (ref.status == "oom")
        t = p.time
        lead = p.lead
        layer_bytes = 2 * p.workload.shape.layer_params
        without_lead = p.nvidia_smi - lead.layers * layer_bytes if lead else None
        time_residual = t.run_seconds / ref.time_s - 1 if ref.time_s else None
        rows.append({"recipe": name, "row": ref.row, "table": ref.memory_printed, "table_gb": ref.memory_gb,
                     "verdict": p.verdict, "predicted_gb": predicted_gb,
                     "live_gb": p.live / reference.BYTES_PER_TABLE_GB,
                     "with_elastic_gb": p.with_elastic / reference.BYTES_PER_TABLE_GB,
                     "residual": residual, "verdict_agrees": verdict_agrees,
                     "within_20pct": residual is not None and abs(residual) <= 0.20,
                     "table_time": ref.time_printed, "table_time_s": ref.time_s,
                     "table_step_s": ref.time_s / t.steps if ref.time_s else None,
                     "predicted_time_s": t.run_seconds, "predicted_step_s": t.step_seconds, "steps": t.steps,
                     "group_seconds": t.group_seconds(), "dominant": t.dominant, "time_residual": time_residual,
                     "time_within_25pct": time_residual is not None and abs(time_residual) <= TIME_TOLERANCE,
                     "zero3_lead": None if lead is None else {
                         "fetch_s": lead.fetch_s, "forward_s": lead.forward_s, "layers": lead.layers,
                         "of_layers": p.workload.shape.layers, "without_lead_gb": without_lead / reference.BYTES_PER_TABLE_GB,
                         # What the lead would have to be for the prediction to equal the table's figure.
                         "table_layers": None if ref.memory_gb is None else
                         (ref.memory_gb * reference.BYTES_PER_TABLE_GB - without_lead) / layer_bytes}})
    return rows


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


def zero3_lead_markdown(rows: list[dict]) -> str:
    """ZeRO-3's gathered layers awaiting the compute stream: the planner's lead against what the table's
    figure leaves over the rest of the prediction, both in layers of bf16 parameters."""
    head = ("| row | recipe | fetch per layer (ms) | forward per layer (ms) | lead, planner (layers) | "
            "table's excess (layers) | table | predicted without the lead | predicted |\n"
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    body = []
    for r in rows:
        lead = r["zero3_lead"]
        if lead is None:
            continue
        excess = "" if lead["table_layers"] is None else f"{lead['table_layers']:.1f}"
        predicted = "OOM" if r["predicted_gb"] is None else f"{r['predicted_gb']:.1f} GB"
        body.append(f"| {r['row']} | {r['recipe']} | {lead['fetch_s'] * 1e3:.1f} | {lead['forward_s'] * 1e3:.1f} | "
                    f"{lead['layers']:.1f} of {lead['of_layers']} | {excess} | {r['table']} | "
                    f"{lead['without_lead_gb']:.1f} GB | {predicted} |")
    return "\n".join([head, *body])


def time_calibration_markdown(rows: list[dict]) -> str:
    """The table's time cells against the planner, with each step's terms (seconds per optimizer step)."""
    head = ("| row | recipe | table | predicted (2023) | residual | steps | s/step table | s/step predicted | "
            "compute | communication | offload traffic | CPU optimizer | dominant |\n"
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    body = []
    for r in rows:
        if r["table_time_s"] is None:
            continue
        g = r["group_seconds"]
        body.append(f"| {r['row']} | {r['recipe']} | {r['table_time']} | {tm.clock(r['predicted_time_s'])} | "
                    f"{r['time_residual']:+.0%} | {r['steps']} | {r['table_step_s']:.1f} | {r['predicted_step_s']:.1f} | "
                    + " | ".join(f"{g[k]:.1f}" for k in tm.GROUPS) + f" | {r['dominant']} |")
    return "\n".join([head, *body])


def time_calibration_figure(rows: list[dict], path) -> None:
    """Predicted full-run time against the table's, log scale, one point per row that ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = [r for r in rows if r["table_time_s"] is not None]
    hours = [r["table_time_s"] / 3600 for r in ran] + [r["predicted_time_s"] / 3600 for r in ran]
    low, high = min(hours) / 1.5, max(hours) * 1.5
    fig, ax = plt.subplots(figsize=(6.5, 6))
    ax.plot([low, high], [low, high], color="grey", lw=1)
    ax.fill_between([low, high], [low * (1 - TIME_TOLERANCE), high * (1 - TIME_TOLERANCE)],
                    [low * (1 + TIME_TOLERANCE), high * (1 + TIME_TOLERANCE)], color="grey", alpha=0.12,
                    label=f"within {TIME_TOLERANCE:.0%}")
    for method, colour in (("fsdp_", "tab:blue"), ("fsdp-offload", "tab:green"), ("zero3", "tab:orange")):
        chosen = [r for r in ran if method in r["recipe"]]
        ax.scatter([r["table_time_s"] / 3600 for r in chosen], [r["predicted_time_s"] / 3600 for r in chosen],
                   color=colour, label=f"{method.strip('_')} rows")
        for r in chosen:
            ax.annotate(str(r["row"]), (r["table_time_s"] / 3600, r["predicted_time_s"] / 3600), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set(xscale="log", yscale="log", xlim=(low, high), ylim=(low, high), xlabel="table time (hours)",
           ylabel="planner time (hours, 2023 stack)", title="Planner time against the GPU Stats table")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
