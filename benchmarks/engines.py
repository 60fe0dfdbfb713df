"""Both engines x FSDP and ZeRO-3 on the visible GPU(s): the tiny preset and a LLaMA-7B-layer-shaped model
(8 decoder layers, batch 4, sequence 2048, bf16, tf32, checkpointing), as FACTS.md measured HF Trainer.

    python benchmarks/engines.py --out DIR [--models tiny llama-7b-8l] [--steps 10] [--ranks 1]

Runs each configuration as a real `python -m shardkit.train` probe and prints one Markdown table (card,
versions, s/step, tokens/s, MFU, memory) built from the results files; all ratios come from one run."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
MODELS = {
    "tiny": ["--model_name_or_path", "tiny", "--per_device_train_batch_size", "4"],
    "llama-7b-8l": ["--model_name_or_path", "llama-7b", "--num_hidden_layers", "8",
                    "--per_device_train_batch_size", "4", "--model_max_length", "2048"],
}
METHODS = {
    "fsdp": ["--fsdp", "full_shard auto_wrap"],
    "fsdp_offload": ["--fsdp", "full_shard auto_wrap offload"],
    "zero3": ["--deepspeed", str(RECIPES / "configs" / "zero3_no_offload.json")],
    "zero3_offload": ["--deepspeed", str(RECIPES / "configs" / "deepspeed_config.json")],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--engines", nargs="+", default=["native", "hf"], choices=["native", "hf"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--ranks", type=int, default=1)
    args = parser.parse_args()
    rows = []
    for model in args.models:
        for method in args.methods:
            for engine in args.engines:
                out = args.out / f"{model}_{method}_{engine}"
                argv = [*MODELS[model], *METHODS[method], "--engine", engine, "--bf16", "True", "--tf32", "True",
                        "--gradient_checkpointing", "True", "--gradient_accumulation_steps", "1",
                        "--max_steps", str(args.steps), "--save_strategy", "no", "--num_examples", "640",
                        "--nproc_per_node", str(args.ranks), "--output_dir", str(out), "--run_name", out.name]
                print(f"== {out.name}", file=sys.stderr, flush=True)
                code = subprocess.call([sys.executable, "-m", "shardkit.train", *argv])
                rows.append(row(out, code))
    table = format_table(rows)
    (args.out / "engines.md").write_text(table)
    print(table)
    return 0


def row(out: Path, code: int) -> dict:
    file = out / "results.json"
    if not file.is_file():
        return {"name": out.name, "status": f"exit {code}, no results"}
    doc = json.loads(file.read_text())
    steady = doc["time"]["steady_state"] or {}
    memory = doc["memory"]["max_over_ranks"]
    env = doc["environment"] or {}
    gib = 2**30
    return {"name": out.name, "status": doc["status"], "gpu": (env.get("gpu") or {}).get("name", env.get("device")),
            "versions": env.get("versions", {}), "s_per_step": steady.get("median_s"),
            "tokens_per_s": doc["throughput"]["tokens_per_s"], "mfu": doc["throughput"]["mfu"],
            "reserved_gib": (memory["gpu_max_reserved_bytes"] or 0) / gib,
            "allocated_gib": (memory["gpu_max_allocated_bytes"] or 0) / gib,
            "nvml_gib": (memory["gpu_nvml_used_peak_bytes"] or 0) / gib}


def format_table(rows: list[dict]) -> str:
    lines = ["| run | status | GPU | s/step | tokens/s | MFU | max reserved GiB | max allocated GiB | NVML GiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "gpu" not in r:
            lines.append(f"| {r['name']} | {r['status']} | | | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        step = f"{r['s_per_step']:.3f}" if r["s_per_step"] else "-"
        tokens = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-"
        lines.append(f"| {r['name']} | {r['status']} | {r['gpu']} | {step} | {tokens} | {mfu} | "
                     f"{r['reserved_gib']:.1f} | {r['allocated_gib']:.1f} | {r['nvml_gib']:.1f} |")
    versions = next((r["versions"] for r in rows if r.get("versions")), {})
    lines.append("")
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
