"""The results document: one JSON per run (``results.json``), built from the resolved run and what it
recorded, partial runs included.

The schema is documented in docs/results.md; bump SCHEMA_VERSION with any change to it. Version 2 names
the method as the recipes do (``zero3_offload``, not ``deepspeed``), adds ``run.offload`` and the statuses
``timeout``, ``interrupted`` and ``killed``; version 3 adds ``run.stack``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from ..errors import UsageError
from ..spec.paths import read_text
from ..spec.typed import OPEN, ValidationError, after_validator, problems, validate
from . import metrics
from .failure import Failure
from .record import Recorder

SCHEMA_VERSION = 3
READABLE_SCHEMA_VERSIONS = (1, 2, 3)
RESULTS_FILE = "results.json"
CONFIG_FILE = "config.json"
SHARDING_FILE = "sharding.json"
MEMORY_SNAPSHOT_FILE = "memory_snapshot.pickle"
# 124, 130 and 137 are what `timeout`, a Ctrl-C and SIGKILL give a shell command: a script can tell them apart.
STATUS_EXIT_CODES = {"ok": 0, "error": 1, "oom": 3, "timeout": 124, "interrupted": 130, "killed": 137}


def stack_label(plan_stack: str, versions: dict | None) -> str:
    """Which stack produced a run: ``period`` (the table's own software: torch before 2.1, whose FSDP is
    FSDP1 without the all-gather limit), ``2023-emulated`` (today's torch running the 2023 behaviours,
    ``--stack 2023``) or ``today``."""
    from packaging.version import Version

    torch_version = (versions or {}).get("torch")
    if torch_version and Version(torch_version).release < (2, 1):
        return "period"
    return "2023-emulated" if plan_stack == "2023" else "today"


def _max_over_ranks(per_rank: list[dict], key: str):
    values = [r["memory"][key] for r in per_rank if r.get("memory") and r["memory"].get(key) is not None]
    return max(values) if values else None


def active_matmul(parameters: dict) -> int:
    """The matmul weights one token meets (fewer than all with experts); results written before the kit knew
    experts hold only "matmul", which was that for every model it ran."""
    return parameters.get("active_matmul", parameters["matmul"])


def document(*, status: str, run, recorder: Recorder | None, per_rank: list[dict], environment: dict | None,
             data_info: dict | None, failure: Failure | None, launch_time: float, now: float) -> dict:
    """The results document (docs/results.md) of a resolved run (spec.resolve.ResolvedRun) from what it
    recorded; works for partial runs too."""
    cfg, plan = run.config, run.plan
    recorder = recorder or Recorder()
    shape = plan.model.hf_config
    step_times = recorder.step_times_s
    steady = metrics.steady_state(step_times, cfg.warmup_steps_excluded)
    step_s = steady["median_s"] if steady else (sum(step_times) / len(step_times) if step_times else None)
    tokens_per_step = plan.global_batch * plan.seq_len
    tokens_per_s = tokens_per_step / step_s if step_s else None
    per_gpu = tokens_per_s / plan.world_size if tokens_per_s else None
    flops = metrics.model_flops_per_token(active_matmul(plan.parameters), shape["num_hidden_layers"],
                                          shape["hidden_size"], plan.seq_len)
    hw_flops = metrics.hardware_flops_per_token(active_matmul(plan.parameters), shape["num_hidden_layers"],
                                                shape["hidden_size"], plan.seq_len, cfg.gradient_checkpointing)
    gpu = (environment or {}).get("gpu")
    peak = metrics.peak_bf16_flops(gpu["name"]) if gpu else None
    started = recorder.training_started_at
    checkpoint_s = sum(recorder.checkpoint_s)
    startup_s = started - launch_time if started else None
    training_s = (now - started - checkpoint_s) if started else None
    projection = None
    if steady and startup_s is not None:
        saves = plan.full_run_steps // cfg.save_steps if cfg.save_strategy == "steps" else 0
        mean_save = checkpoint_s / len(recorder.checkpoint_s) if recorder.checkpoint_s else 0.0

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
        "failure": failure.to_dict() if failure else None,
        "run": {"name": cfg.run_name, "model": plan.model.name, "method": plan.parallelism.name,
                "offload": plan.parallelism.offload, "engine": plan.engine,
                "stack": stack_label(plan.stack, (environment or {}).get("versions")),
                "attn_implementation": cfg.attn_implementation, "gradient_checkpointing": cfg.gradient_checkpointing,
                "bf16": cfg.bf16, "world_size": plan.world_size, "fake_world": plan.world_size if plan.fake_world else None, "micro_batch": plan.micro_batch,
                "gradient_accumulation_steps": plan.gradient_accumulation_steps, "global_batch": plan.global_batch,
                "seq_len": plan.seq_len, "parameters": plan.parameters, "steps_planned": plan.total_steps,
                "steps_full_run": plan.full_run_steps, "probe": plan.total_steps < plan.full_run_steps,
                "resumed_from_step": recorder.resumed_from_step},
        "time": {"wall_time_s": now - launch_time, "wall_time_source": "worker", "startup_s": startup_s,
                 "training_s": training_s, "checkpoint_s": checkpoint_s,
                 "checkpoint_saves_s": recorder.checkpoint_s, "step_times_s": step_times,
                 "first_step": recorder.first_step, "steady_state": steady, "projected_full_run": projection},
        "throughput": {"tokens_per_step": tokens_per_step, "tokens_per_s": tokens_per_s,
                       "tokens_per_s_per_gpu": per_gpu, "model_flops_per_token": flops,
                       "hardware_flops_per_token": hw_flops, "peak_flops_per_gpu": peak,
                       "mfu": metrics.utilization(flops, per_gpu, peak),
                       "hfu": metrics.utilization(hw_flops, per_gpu, peak)},
        "memory": {"max_over_ranks": {key: _max_over_ranks(per_rank, key) for key in
                                      ("gpu_max_reserved_bytes", "gpu_max_allocated_bytes",
                                       "gpu_nvml_used_peak_bytes", "host_rss_peak_bytes")},
                   "per_rank": per_rank},
        "loss": recorder.loss,
        "lr": recorder.lr,
        "data": data_info,
        "environment": environment,
    }


def with_failure(document: dict, failure: Failure) -> dict:
    """The same run, ended by ``failure`` instead: what it recorded (steps, losses, peaks) is kept."""
    return {**document, "status": failure.status, "exit_code": STATUS_EXIT_CODES[failure.status],
            "failure": failure.to_dict()}


# What a reader of results (the diff, the report) relies on; other fields may come and go within a version.
class _Part(BaseModel, **OPEN):
    """Fields beyond those declared are kept: a reader names what it needs, a writer may add more."""


class _Failure(_Part):
    message: str
    rank: int | None = None
    step: int | None = None


class _Run(_Part):
    name: str | None = None
    world_size: int
    probe: bool = False
    fake_world: int | None = None


class _Time(_Part):
    wall_time_s: float
    projected_full_run: dict | None = None


class _Memory(_Part):
    max_over_ranks: dict[str, float | None]


class _Document(_Part):
    status: Literal[tuple(STATUS_EXIT_CODES)]  # type: ignore[valid-type]
    failure: _Failure | None
    run: _Run
    time: _Time
    memory: _Memory
    loss: list[float]
    environment: dict | None = None

    @after_validator
    def _failure_says_why(self) -> _Document:
        if self.status != "ok" and self.failure is None:
            raise ValueError(f"status {self.status!r} without a failure saying what happened")
        return self


def read_results(path: str | Path) -> dict:
    """A results file, checked against what its readers rely on; anything else is one line naming the file."""
    path = Path(path)
    try:
        text = read_text(path)
    except OSError as error:
        raise UsageError(f"{path}: cannot read it ({error.strerror})") from None
    if not text.strip():
        raise UsageError(f"{path}: empty file, not a results document")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"{path}:{error.lineno}:{error.colno}: not valid JSON ({error.msg}); "
                         "cut short or not a results document") from None
    if not isinstance(document, dict):
        raise UsageError(f"{path}: a JSON {type(document).__name__}, not a results document (an object)")
    if document.get("schema_version") not in READABLE_SCHEMA_VERSIONS:
        raise UsageError(f"{path}: schema_version {document.get('schema_version')!r}; this shardkit reads "
                         f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))}")
    try:
        validate(_Document, document)
    except ValidationError as error:
        first = problems(error, document)[0]
        where = ".".join(map(str, first["loc"]))
        if first["missing"]:
            raise UsageError(f"{path}: {where} is missing") from None
        shown = repr(first["input"])
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        message = first["msg"]
        raise UsageError(f"{path}: {where + ' ' + shown + ': ' if where else ''}{message}") from None
    return document
