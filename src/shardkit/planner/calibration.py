"""The planner against the table: each row's prediction on the table's card, with residuals, as rows, a
Markdown table and a figure (``shardkit plan --calibration``)."""

from __future__ import annotations

from ..spec import reference
from ..spec.recipes import load_recipe
from .predict import DEFAULT_GPU_MEMORY, GIB, predict_recipe


def calibration(stack: str = "2023") -> list[dict]:
    """Each table row against its prediction on the table's card (A100 80GB), in the table's GB."""
    rows = []
    for name, ref in reference.load_table().items():
        p = predict_recipe(load_recipe(name), stack, DEFAULT_GPU_MEMORY)
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
