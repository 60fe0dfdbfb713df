"""The report: Markdown and CSV written from the same rows, and a PNG of memory and time per row
(reference against measured, OOM cells marked)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ..results.files import write_json_atomic, write_text_atomic
from .diff import Verdict

COLUMNS = ["recipe", "verdict", "reference_memory", "measured_memory_gb", "predicted_memory_gb", "memory_ratio",
           "reference_time_s", "measured_time_s", "time_basis", "normalized_time_s", "predicted_time_s", "time_ratio",
           "gpu", "torch", "stack", "reason"]


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return ""
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _predicted(predicted: dict) -> str:
    if not predicted:
        return ""
    figure = "OOM" if predicted["memory_gb"] is None else f"{predicted['memory_gb']:.1f}"
    return f"{figure} ({predicted['stack']})"


def rows(verdicts: list[Verdict]) -> list[dict]:
    out = []
    for v in verdicts:
        m, r = v.measured, v.reference
        ratios = m.get("ratios", {})
        out.append({
            "recipe": v.recipe, "verdict": v.verdict,
            "reference_memory": r.get("memory_printed", ""), "measured_memory_gb": _fmt(m.get("memory_gb"), 1),
            "predicted_memory_gb": _predicted(v.predicted),
            "memory_ratio": _fmt(ratios.get("memory")), "reference_time_s": _fmt(r.get("time_s")),
            "measured_time_s": _fmt(m.get("time_s"), 0), "time_basis": m.get("time_basis", ""),
            "normalized_time_s": _fmt(m.get("time_s_normalized"), 0),
            "predicted_time_s": _fmt((v.predicted or {}).get("time_s"), 0), "time_ratio": _fmt(ratios.get("time")),
            "gpu": m.get("gpu") or "", "torch": (m.get("versions") or {}).get("torch") or "",
            "stack": m.get("stack", ""), "reason": v.reason,
        })
    return out


def shown_columns(table: list[dict]) -> list[str]:
    """The columns some row fills: a tiny row has no reference memory or time, no prediction and no GPU,
    and a table of them showed ten empty columns out of sixteen. The row's name and verdict always show."""
    return [c for c in COLUMNS if c in ("recipe", "verdict") or any(str(row[c]) for row in table)]


def markdown(table: list[dict]) -> str:
    """The table for people: only the columns that apply to some row (the CSV keeps all, for scripts)."""
    columns = shown_columns(table)
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]).replace("|", "/") for c in columns) + " |" for row in table]
    return "\n".join(lines) + "\n"


def csv_text(table: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(table)
    return buffer.getvalue()


def verdicts_document(verdicts: list[Verdict]) -> dict:
    """verdicts.json, and what diff --json prints."""
    return {"verdicts": [v.to_dict() for v in verdicts]}


def figure(verdicts: list[Verdict], path: Path) -> None:
    """Two panels, one bar pair per row: memory (GB) and time (hours), reference beside measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [v.recipe for v in verdicts]
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.55 * len(names) + 3), 8), sharex=True)
    positions = range(len(names))
    panels = (("memory (GB)", "memory_gb", "memory_gb", 1.0), ("time (h)", "time_s", "time_s_normalized", 3600.0))
    for ax, (label, ref_key, measured_key, scale) in zip(axes, panels, strict=True):
        for i, v in enumerate(verdicts):
            ref = v.reference.get(ref_key)
            got = v.measured.get(measured_key)
            if got is None and measured_key == "time_s_normalized":
                got = v.measured.get("time_s")
            if ref is not None:
                ax.bar(i - 0.2, ref / scale, width=0.4, color="#9aa5b1", label="reference" if i == 0 else None)
            elif v.reference.get("status") == "oom":
                ax.text(i - 0.2, 0, "OOM", rotation=90, ha="center", va="bottom", fontsize=7, color="#555")
            if got is not None:
                color = {"reproduced": "#2e7d32", "better": "#1565c0"}.get(v.verdict, "#c62828")
                ax.bar(i + 0.2, got / scale, width=0.4, color=color)
            elif v.verdict.startswith("oom") or v.verdict in ("not-run", "error"):
                tag = "OOM" if v.verdict.startswith("oom") else v.verdict
                ax.text(i + 0.2, 0, tag, rotation=90, ha="center", va="bottom", fontsize=7, color="#c62828")
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    for i, v in enumerate(verdicts):
        for ax, key, scale in ((axes[0], "memory_gb", 1.0), (axes[1], "time_s", 3600.0)):
            if (v.predicted or {}).get(key) is not None:
                ax.plot([i - 0.4, i + 0.4], [v.predicted[key] / scale] * 2, color="black", lw=1.5)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ("#9aa5b1", "#2e7d32", "#1565c0", "#c62828")]
    handles.append(plt.Line2D([0], [0], color="black", lw=1.5))
    axes[0].legend(handles, ["reference", "measured: reproduced", "measured: better", "measured: worse / other",
                             "planner"], fontsize=8, loc="upper left")
    axes[1].set_xticks(list(positions), names, rotation=60, ha="right", fontsize=7)
    axes[0].set_title("shardkit: measured against the GPU Stats table (time normalized to the reference GPU)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write(verdicts: list[Verdict], folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    table = rows(verdicts)
    paths = {"markdown": folder / "report.md", "csv": folder / "report.csv", "json": folder / "verdicts.json"}
    write_text_atomic(paths["markdown"], markdown(table))
    write_text_atomic(paths["csv"], csv_text(table))
    write_json_atomic(paths["json"], verdicts_document(verdicts))
    table_rows = [v for v in verdicts if "loss" not in v.reference]
    curve_rows = [v for v in verdicts if "loss" in v.reference]
    if table_rows:
        paths["png"] = folder / "report.png"
        figure(table_rows, paths["png"])
    if curve_rows:
        paths["loss_png"] = folder / "loss.png"
        loss_figure(curve_rows, paths["loss_png"])
    return paths


def loss_figure(verdicts: list[Verdict], path: Path) -> None:
    """Loss per step of the tiny rows: the reference run's curve and this run's, one panel per recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [v for v in verdicts if "loss" in v.reference]
    fig, axes = plt.subplots(1, max(1, len(curves)), figsize=(4 * max(1, len(curves)), 3.4), squeeze=False)
    for ax, v in zip(axes[0], curves, strict=False):
        ref = v.reference["loss"]
        ax.plot(range(1, len(ref) + 1), ref, "o-", color="#9aa5b1", label="reference", lw=3)
        got = v.measured.get("loss")
        if got:
            ax.plot(range(1, len(got) + 1), got, "x--", color="#2e7d32" if v.verdict == "reproduced" else "#c62828",
                    label=f"measured: {v.verdict}")
        ax.set_title(v.recipe, fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("loss")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
