"""Results files: one JSON per run, written atomically (a crash mid-write never leaves a torn file).

The schema is documented in docs/results.md; bump SCHEMA_VERSION with any change to it."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"
CONFIG_FILE = "config.json"
STATUS_EXIT_CODES = {"ok": 0, "error": 1, "oom": 3}


def write_json_atomic(path: str | Path, payload: dict) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide results from everyone but their writer
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2, sort_keys=False, default=str)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def _max_over_ranks(per_rank: list[dict], key: str):
    values = [r["memory"][key] for r in per_rank if r.get("memory") and r["memory"].get(key) is not None]
    return max(values) if values else None


def build(*, status: str, cfg, plan, record: dict, per_rank: list[dict], environment: dict | None,
          data_info: dict | None, failure: dict | None, launch_time: float, now: float) -> dict:
    """The results document (docs/results.md) from what the run recorded; works for partial runs too."""
    from . import metrics

    shape = plan.model.hf_config
    step_times = record.get("step_times_s", [])
    steady = metrics.steady_state(step_times, cfg.warmup_steps_excluded)
    step_s = steady["median_s"] if steady else (sum(step_times) / len(step_times) if step_times else None)
    tokens_per_step = plan.global_batch * plan.seq_len
    tokens_per_s = tokens_per_step / step_s if step_s else None
    per_gpu = tokens_per_s / plan.world_size if tokens_per_s else None
    flops = metrics.model_flops_per_token(plan.parameters["matmul"], shape["num_hidden_layers"],
                                          shape["hidden_size"], plan.seq_len)
    hw_flops = metrics.hardware_flops_per_token(plan.parameters["matmul"], shape["num_hidden_layers"],
                                                shape["hidden_size"], plan.seq_len, cfg.gradient_checkpointing)
    gpu = (environment or {}).get("gpu")
    peak = metrics.peak_bf16_flops(gpu["name"]) if gpu else None
    started = record.get("training_started_at")
    checkpoint_s = sum(record.get("checkpoint_s", []))
    startup_s = started - launch_time if started else None
    training_s = (now - started - checkpoint_s) if started else None
    projection = None
    if steady and startup_s is not None:
        saves = plan.full_run_steps // cfg.save_steps if cfg.save_strategy == "steps" else 0
        mean_save = checkpoint_s / len(record["checkpoint_s"]) if record.get("checkpoint_s") else 0.0
        def project(step_time):
            return startup_s + plan.full_run_steps * step_time + saves * mean_save
        projection = {"wall_time_s": project(steady["median_s"]),
                      "range_s": [project(steady["min_s"]), project(steady["max_s"])],
                      "basis": f"start-up + {plan.full_run_steps} steps x steady-state step time + {saves} saves",
                      "steps": plan.full_run_steps}
    return {
        "schema_version": SCHEMA_VERSION,
        "status": status,
        "exit_code": STATUS_EXIT_CODES[status],
        "failure": failure,
        "run": {"name": cfg.run_name, "model": plan.model.name, "method": plan.method, "engine": plan.engine,
                "attn_implementation": cfg.attn_implementation, "gradient_checkpointing": cfg.gradient_checkpointing,
                "bf16": cfg.bf16, "world_size": plan.world_size, "fake_world": cfg.fake_world, "micro_batch": plan.micro_batch,
                "gradient_accumulation_steps": plan.gradient_accumulation_steps, "global_batch": plan.global_batch,
                "seq_len": plan.seq_len, "parameters": plan.parameters, "steps_planned": plan.total_steps,
                "steps_full_run": plan.full_run_steps, "probe": plan.total_steps < plan.full_run_steps,
                "resumed_from_step": record.get("resumed_from_step")},
        "time": {"wall_time_s": now - launch_time, "wall_time_source": "worker", "startup_s": startup_s,
                 "training_s": training_s, "checkpoint_s": checkpoint_s,
                 "checkpoint_saves_s": record.get("checkpoint_s", []), "step_times_s": step_times,
                 "first_step": record.get("first_step"), "steady_state": steady, "projected_full_run": projection},
        "throughput": {"tokens_per_step": tokens_per_step, "tokens_per_s": tokens_per_s,
                       "tokens_per_s_per_gpu": per_gpu, "model_flops_per_token": flops,
                       "hardware_flops_per_token": hw_flops, "peak_flops_per_gpu": peak,
                       "mfu": metrics.utilization(flops, per_gpu, peak),
                       "hfu": metrics.utilization(hw_flops, per_gpu, peak)},
        "memory": {"max_over_ranks": {key: _max_over_ranks(per_rank, key) for key in
                                      ("gpu_max_reserved_bytes", "gpu_max_allocated_bytes",
                                       "gpu_nvml_used_peak_bytes", "host_rss_peak_bytes")},
                   "per_rank": per_rank},
        "loss": record.get("loss", []),
        "lr": record.get("lr", []),
        "data": data_info,
        "environment": environment,
    }
