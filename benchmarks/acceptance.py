"""The GPU acceptance check: what shardkit measures, measured on one GPU, checked, and written up in one call
(benchmarks/gpu_acceptance.sh runs it; docs/performance.md says how).

Stages, cheapest and most important first. Each has a time budget, all share one deadline, and the report
(report.md and report.json under --out) is rewritten atomically after every run and stage, so a run cut short
keeps what it did:

  environment  card, driver, versions, the measured bf16 matmul rate
  gpu_tests    the pytest tests marked gpu
  tiny         the tiny recipes: four methods on the native engine, the two DeepSpeed ones through HF Trainer
  oom          a forced out-of-memory that must end as an oom result (exit 3) with its peaks
  replays      --fake_world replays of the FSDP rows that today's stack fits on an 80 GiB card, against the planner
  engines      the LLaMA-7B-layer-shaped model (8 layers) through both engines, FSDP and ZeRO-3
  zero3_lead   ZeRO-3 + offload on that model at two micro-batches: reserved beyond allocated against the
               planner's gathered layers awaiting the compute stream
  replays_2023 the same replays with --stack 2023 (FSDP1 as the table ran it, accumulation kept), against the
               planner's 2023 stack and the table's figures; last, with what is left

A 7-minute run rarely gets past engines: a second call runs the last two
(GPU_ACCEPTANCE_STAGES=zero3_lead,replays_2023).

With --rehearsal the same stages run on CPU with tiny shapes (gloo, no NVML), so that the script is known to
work before a GPU is at hand (tests/test_gpu_acceptance.py). Every figure in the report comes from a
results.json or a measured call."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from shardkit import planner
from shardkit.orchestration import campaign, smoke
from shardkit.results import document as results
from shardkit.results.files import read_json, write_json_atomic
from shardkit.spec import recipes, reference
from shardkit.spec.parallelism import Parallelism

ROOT = Path(__file__).resolve().parents[1]
GIB, MIB = 2**30, 2**20
CARD = planner.DEFAULT_GPU_MEMORY  # the table's "80GB" cards: replays are capped to this
# Memory that one-rank runs of several GPUs' worth of work on one card must not crowd: the host's share that a
# replayed rank's offloaded states may take (the rest is the process itself and the page cache).
HOST_SHARE = 0.75
MEMORY_KEYS = ("gpu_max_allocated_bytes", "gpu_max_reserved_bytes", "gpu_nvml_used_peak_bytes")
TARBALL_LIMIT = 15 * MIB  # a file over 16 MiB does not come back from a GPU machine
# The replay whose allocator history comes back (its segments and streams, for the reserve model).
SNAPSHOT_ROW = "llama-7b_fsdp_8gpu_bs1"
# A catalogued grouped-query-attention model beyond the table, replayed with each allocator configuration.
GQA_ROW = "llama-3.1-8b_fsdp_8gpu_bs1"
ALLOCATOR_CONF = {"default": "expandable_segments:False", "expandable": "expandable_segments:True"}


class Interrupted(BaseException):
    """SIGTERM (the shell's time limit): stop the running stage, keep what was done."""


# --- the harness: runs with deadlines, the report written as it grows ---------------------------------------

@dataclass
class Run:
    name: str
    argv: list[str]  # after the Python interpreter
    folder: Path  # its results.json is found below it
    preexec: Callable[[], None] | None = None
    env: dict[str, str] = field(default_factory=dict)  # on top of this process's environment


@dataclass
class Context:
    rehearsal: bool
    out: Path
    work: Path
    deadline: float  # time.monotonic()
    report: dict
    started: float = field(default_factory=time.monotonic)
    ops_build: subprocess.Popen | None = None

    @property
    def cuda(self) -> bool:
        return not self.rehearsal

    def log(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {message}", flush=True)

    def save(self) -> None:
        self.report["elapsed_s"] = round(time.monotonic() - self.started, 1)
        self.report["updated_at"] = _now()
        write_json_atomic(self.out / "report.json", self.report)
        _write_text_atomic(self.out / "report.md", render(self.report))
        _write_tarball(self.work / "runs", self.out / "runs.tgz")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _write_tarball(folder: Path, path: Path) -> None:
    """The runs' raw files; their logs are dropped if the whole would not come back from the GPU machine."""
    if not folder.is_dir():
        return
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".json", ".log", ".xml"))
    for keep in (files, [p for p in files if p.suffix != ".log"]):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        with tarfile.open(tmp, "w:gz") as tar:
            for file in keep:
                tar.add(file, arcname=str(file.relative_to(folder.parent)))
        if os.path.getsize(tmp) <= TARBALL_LIMIT or keep is not files:
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
            return
        os.unlink(tmp)


def _kill_tree(process: subprocess.Popen) -> None:
    """The launcher and every rank: torchrun starts its workers in sessions of their own, so killing the
    launcher's process group alone would leave ranks holding the GPU."""
    import psutil

    try:
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for member in tree:
            try:
                member.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(tree, timeout=10)
        if not alive:
            break
        tree = alive
    process.wait()


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_all(ctx: Context, stage: dict, runs: list[Run], deadline: float, jobs: int = 1) -> list[dict]:
    """Runs up to ``jobs`` at once, each in its own process tree with its log beside its results; a run still
    going at the deadline is killed, and runs not started by then are recorded as not run."""
    pending, active, outcomes = list(runs), {}, {}
    try:
        while pending or active:
            while pending and len(active) < jobs and time.monotonic() < deadline - 2:
                run = pending.pop(0)
                run.folder.mkdir(parents=True, exist_ok=True)
                log = run.folder / f"{run.name}.log"
                ctx.log(f"{stage['name']}: start {run.name}")
                with open(log, "w") as handle:
                    process = subprocess.Popen([sys.executable, *run.argv], cwd=ROOT, stdout=handle,
                                               stderr=subprocess.STDOUT, start_new_session=True,
                                               preexec_fn=run.preexec, env={**os.environ, **run.env})
                active[run.name] = (run, process, time.monotonic(), log)
            if not active:
                break
            time.sleep(0.2)
            late = time.monotonic() >= deadline
            for name, (run, process, began, log) in list(active.items()):
                killed = process.poll() is None and late
                if process.poll() is None and not late:
                    continue
                if killed:
                    _kill_tree(process)
                outcomes[name] = _outcome(run, process.returncode, time.monotonic() - began, log, cut_short=killed)
                del active[name]
                ctx.log(f"{stage['name']}: {name}: {outcomes[name]['status']} (exit {process.returncode}, "
                        f"{outcomes[name]['seconds']:.0f} s)")
    finally:
        for run, process, began, log in active.values():
            _kill_tree(process)
            outcomes[run.name] = _outcome(run, process.returncode, time.monotonic() - began, log, cut_short=True)
    for run in pending:
        outcomes[run.name] = {"name": run.name, "status": "not run", "exit_code": None, "seconds": 0.0,
                              "cut_short": True, "results": None, "log_tail": ""}
    if any(o["cut_short"] for o in outcomes.values()):
        stage["cut_short"] = True
    return [outcomes[run.name] for run in runs]


def _outcome(run: Run, code: int | None, seconds: float, log: Path, cut_short: bool) -> dict:
    found = sorted(run.folder.rglob(results.RESULTS_FILE))
    doc = read_json(found[0]) if found else None
    status = "cut short" if cut_short else (doc["status"] if doc else f"no results (exit {code})")
    return {"name": run.name, "status": status, "exit_code": code, "seconds": round(seconds, 1),
            "cut_short": cut_short, "results": doc,
            "log_tail": _tail(log) if status != "ok" else ""}


# --- what every results.json must show ------------------------------------------------------------------------

def memory_of(doc: dict | None) -> dict:
    return ((doc or {}).get("memory") or {}).get("max_over_ranks") or {}


def memory_checks(ctx: Context, doc: dict | None) -> dict[str, bool | None]:
    """Allocated, reserved and NVML peaks present and ordered on a GPU (None: not applicable on CPU), and
    max_over_ranks really the largest per-rank figure of each kind."""
    peaks, per_rank = memory_of(doc), ((doc or {}).get("memory") or {}).get("per_rank") or []
    present = all(peaks.get(k) for k in MEMORY_KEYS) if ctx.cuda else None
    ordered = None
    if present:
        allocated, reserved, nvml = (peaks[k] for k in MEMORY_KEYS)
        ordered = allocated <= reserved <= nvml
    largest = {}
    for key in (*MEMORY_KEYS, "host_rss_peak_bytes"):
        values = [r["memory"][key] for r in per_rank if r.get("memory") and r["memory"].get(key) is not None]
        largest[key] = max(values) if values else None
    return {"peaks present": present, "allocated <= reserved <= NVML": ordered,
            "max over ranks": bool(per_rank) and all(peaks.get(k) == v for k, v in largest.items())}


def device_check(ctx: Context, doc: dict | None) -> bool:
    return ((doc or {}).get("environment") or {}).get("device") == ("cuda" if ctx.cuda else "cpu")


def finish_row(row: dict) -> dict:
    row["ok"] = all(v is not False for v in row["checks"].values()) and any(row["checks"].values())
    return row


def memory_columns(doc: dict | None) -> dict:
    peaks = memory_of(doc)
    return {"allocated": peaks.get("gpu_max_allocated_bytes"), "reserved": peaks.get("gpu_max_reserved_bytes"),
            "nvml": peaks.get("gpu_nvml_used_peak_bytes"), "host_rss": peaks.get("host_rss_peak_bytes")}


# --- stages -------------------------------------------------------------------------------------------------------

def stage_environment(ctx: Context, stage: dict, deadline: float) -> None:
    # In a child process: a CUDA context opened here would sit on the card through every later measurement.
    done = subprocess.run([sys.executable, __file__, "--probe-environment"], cwd=ROOT, capture_output=True,
                          text=True, timeout=max(1.0, deadline - time.monotonic()))
    if done.returncode != 0:
        raise RuntimeError(f"environment probe failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    wheels = os.environ.get("GPU_ACCEPTANCE_WHEELS")
    probe["wheels"] = wheels or "none carried"
    stage["probe"] = probe
    ctx.report["card"] = (probe.get("gpu") or {}).get("name")
    checks = {"device": probe["device"] == ("cuda" if ctx.cuda else "cpu"),
              "deepspeed imports": probe["deepspeed_error"] is None,
              "matmul rate measured": (probe["matmul_bf16_flops_8192"] or 0) > 0 if ctx.cuda else None,
              "driver read": bool(probe["driver"]) if ctx.cuda else None,
              "carried wheels install": wheels.startswith("pip exit 0:") if wheels else None}
    stage["rows"].append(finish_row({"name": "environment", "checks": checks}))


def probe_environment() -> dict:
    """Run as a child: what the card and the software are, and the bf16 matmul rate at 8192^3."""
    import shutil
    from importlib import metadata

    import psutil
    import torch

    from shardkit.engine.environment import capture
    from shardkit.engine.measure import matmul_bf16_flops
    from shardkit.results import metrics

    found = capture(1)
    for name in ("pydantic", "pydantic_core", "nvidia-ml-py"):
        try:
            found["versions"][name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found["versions"][name] = None
    found["torch_build"] = torch.__version__
    found["host_memory_bytes"] = psutil.virtual_memory().total
    found["torch_cuda_arch_list"] = os.environ.get("TORCH_CUDA_ARCH_LIST")
    found["nvcc"] = shutil.which("nvcc")
    found["matmul_bf16_flops_8192"] = matmul_bf16_flops(8192, 20)
    found["peak_bf16_flops"] = metrics.peak_bf16_flops((found["gpu"] or {}).get("name"))
    found["nvml_total_bytes"] = None
    if torch.cuda.is_available():
        try:
            import pynvml

            pynvml.nvmlInit()
            found["nvml_total_bytes"] = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total
        except Exception as error:  # reported, not fatal: the gpu tests say more
            found["nvml_total_bytes"] = f"{type(error).__name__}: {error}"
    try:
        from deepspeed.accelerator import get_accelerator

        found["deepspeed_accelerator"], found["deepspeed_error"] = get_accelerator()._name, None
    except Exception as error:
        found["deepspeed_accelerator"], found["deepspeed_error"] = None, f"{type(error).__name__}: {error}"
    return found


def build_ops() -> None:
    """Run as a child, in the background from the start: JIT-compile the DeepSpeed ops the runs will load, so
    that the compile overlaps the first stages; runs that need an op meanwhile wait on its lock."""
    from shardkit.engine.deepspeed_ops import build_ops, op_names

    # Stopped mid-compile, torch's extension loader must still remove its lock file (it does in a finally);
    # a lock left behind makes every later load of that op wait forever.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    # Under shardkit's build lock, as the launchers build: they wait for this one instead of racing it.
    began = time.monotonic()
    names = sorted({*op_names(offload=False), *op_names(offload=True)})
    build_ops(names)
    print(json.dumps({"ops": names, "status": "built", "seconds": round(time.monotonic() - began, 1)}), flush=True)


def stage_gpu_tests(ctx: Context, stage: dict, deadline: float) -> None:
    junit = ctx.work / "runs" / "gpu-tests.xml"
    junit.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "gpu",
               "tests/test_gpu.py", f"--junitxml={junit}"]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                              timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        stage["cut_short"] = True
        return
    stage["pytest_exit_code"] = done.returncode
    stage["pytest_tail"] = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            found = case.find(kind)
            if found is not None:
                outcome, message = {"failure": "failed"}.get(kind, kind), found.get("message", "")
        expected = "skipped" if ctx.rehearsal else "passed"
        checks = {f"{expected}": outcome == expected}
        if ctx.rehearsal:
            checks["skipped for want of CUDA"] = "needs a CUDA GPU" in message
        stage["rows"].append(finish_row({"name": case.get("name"), "outcome": outcome,
                                         "seconds": float(case.get("time", 0)), "message": message[:300],
                                         "checks": checks}))
    if len(stage["rows"]) < 3:
        raise RuntimeError(f"pytest ran {len(stage['rows'])} gpu tests, expected at least 3:\n{stage['pytest_tail']}")


def stage_tiny(ctx: Context, stage: dict, deadline: float) -> None:
    runs, shapes = [], {}
    for name in smoke.TINY:
        method = recipes.load_recipe(name).method
        # One GPU cannot hold two NCCL ranks: FSDP stands for its 2 ranks with a fake world, DeepSpeed runs 1.
        world = ["--fake_world", "2"] if method.startswith("fsdp") else []
        for engine in ("native", "hf"):
            if engine == "hf" and method.startswith("fsdp"):
                continue  # --fake_world is the native engine's; HF FSDP runs in the engines stage
            label = f"{name}.{engine}"
            shapes[label] = (method, engine, "fake 2" if world else "1")
            root = ctx.work / "runs" / "tiny" / engine
            runs.append(Run(label, ["-m", "shardkit", "run", name, "--runner", "native", "--results", str(root),
                                    "--probe", "4", "--nproc_per_node", "1", "--engine", engine, *world],
                            campaign.row_dir(root, recipes.load_recipe(name), 4)))
    # Checks, not measurements: on a GPU they share the card at once; on CPU cores, one at a time is faster.
    jobs = len(runs) if ctx.cuda else 1
    if ctx.cuda:
        stage["notes"].append("The tiny runs share the card at once: each NVML figure is the whole card's, so it "
                              "includes the other runs.")
    for outcome in run_all(ctx, stage, runs, deadline, jobs=jobs):
        doc = outcome["results"]
        method, engine, world = shapes[outcome["name"]]
        checks = {"status ok": outcome["status"] == "ok" and outcome["exit_code"] == 0,
                  "engine": ((doc or {}).get("run") or {}).get("engine") == engine,
                  "device": device_check(ctx, doc), **memory_checks(ctx, doc)}
        stage["rows"].append(finish_row({"name": outcome["name"], "method": method, "engine": engine,
                                         "world": world, **_brief(outcome), **memory_columns(doc),
                                         "checks": checks}))
        stage["results"][outcome["name"]] = doc
    stage["ops_build"] = _ops_build_status(ctx)
    ctx.save()


def _brief(outcome: dict) -> dict:
    return {key: outcome[key] for key in ("status", "exit_code", "seconds", "log_tail")}


def _ops_build_status(ctx: Context) -> dict:
    if ctx.ops_build is None:
        return {"status": "not started"}
    lines = _tail(ctx.work / "runs" / "ops-build.log", 200).splitlines()
    built = [json.loads(line) for line in lines if line.startswith("{")]
    code = ctx.ops_build.poll()
    return {"status": "running" if code is None else f"exit {code}", "ops": built,
            "log_tail": "" if code == 0 else "\n".join(lines[-15:])}


def stage_oom(ctx: Context, stage: dict, deadline: float) -> None:
    batch, heads, seq = 64, 32, 2048
    # Eager attention keeps one fp32 score tensor of batch x heads x seq^2: the first allocation past the cap.
    asked = batch * heads * seq * seq * 4
    cap_gib = 4
    folder = ctx.work / "runs" / "oom"
    argv = ["-m", "shardkit.train", "--model_name_or_path", "tiny", "--fsdp", "full_shard auto_wrap",
            "--per_device_train_batch_size", str(batch), "--num_attention_heads", str(heads),
            "--model_max_length", str(seq), "--num_examples", str(batch), "--max_steps", "2", "--save_strategy", "no",
            "--nproc_per_node", "1",
            "--max_gpu_memory", str(cap_gib), "--output_dir", str(folder), "--run_name", "forced-oom"]
    # On CPU the address-space limit plays the card (as tests/test_training.py does); a CUDA process needs
    # far more address space than memory, so on the GPU the --max_gpu_memory cap alone does it.
    preexec = None if ctx.cuda else _cap_address_space
    stage["notes"].append(f"Forced by {'a ' + str(cap_gib) + ' GiB --max_gpu_memory cap' if ctx.cuda else 'a 12 GiB address-space limit'}: "
                          f"micro-batch {batch} x {heads} heads x {seq} tokens of eager attention asks "
                          f"{asked / GIB:.0f} GiB at once.")
    (outcome,) = run_all(ctx, stage, [Run("forced-oom", argv, folder, preexec)], deadline)
    doc = outcome["results"] or {}
    failure = doc.get("failure") or {}
    mine = ((doc.get("memory") or {}).get("per_rank") or [{}])[0].get("memory") or {}
    cap = (doc.get("environment") or {}).get("gpu_memory_cap_bytes")
    checks = {"exit code 3": outcome["exit_code"] == 3, "status oom": doc.get("status") == "oom",
              "failure kind oom": failure.get("kind") == "oom",
              "device": failure.get("device") == ("cuda" if ctx.cuda else "cpu"),
              "bytes requested parsed": failure.get("bytes_requested") == asked,
              "at step 1": failure.get("step") == 1,
              "peaks kept": (bool(mine.get("gpu_max_allocated_bytes")) and
                             mine["gpu_max_allocated_bytes"] <= (mine.get("gpu_max_reserved_bytes") or 0))
              if ctx.cuda else bool(mine.get("host_rss_peak_bytes")),
              "cap recorded": abs((cap or 0) - cap_gib * GIB) <= 1 if ctx.cuda else cap is None}
    stage["rows"].append(finish_row({"name": "forced-oom", **_brief(outcome), "bytes_asked": asked,
                                     "bytes_requested": failure.get("bytes_requested"),
                                     "failure_device": failure.get("device"), "failure_step": failure.get("step"),
                                     "message": failure.get("message"), "cap_bytes": cap,
                                     **memory_columns(doc), "checks": checks}))
    stage["results"]["forced-oom"] = outcome["results"]


def _cap_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (12 * GIB, 12 * GIB))


def replay_candidates(stack: str = "today") -> tuple[list[tuple], list[dict]]:
    """The table's FSDP rows with the stack's prediction on the table's card; the rows to replay, nearest the
    card first (where a planner error would flip a verdict), and the rows left out. Today's replays take one
    micro-batch per optimizer step (FSDP2 syncs every micro-batch, so accumulation does not change a rank's
    peak); the 2023 stack's keep the row's accumulation, whose no_sync() gradients are its largest term."""
    import psutil

    host = psutil.virtual_memory().total
    chosen, left_out = [], []
    for name in reference.load_table():
        recipe = recipes.load_recipe(name)
        if not recipe.method.startswith("fsdp"):
            continue
        if stack == "today":
            recipe = recipe.model_copy(update={"grad_accum": 1})
        p = planner.predict_recipe(recipe, stack, CARD)
        per_rank_host = p.host / recipe.gpus
        if p.verdict == "oom":
            left_out.append({"name": name, "why": f"predicted OOM on {CARD / GIB:.0f} GiB "
                                                  f"({p.live / GIB:.1f} GiB live)", "prediction": p.to_dict()})
        elif per_rank_host > HOST_SHARE * host:
            left_out.append({"name": name, "why": f"one rank's host states {per_rank_host / GIB:.0f} GiB exceed "
                                                  f"{HOST_SHARE:.0%} of this host's {host / GIB:.0f} GiB",
                             "prediction": p.to_dict()})
        else:
            chosen.append((recipe, p))
    chosen.sort(key=lambda pair: pair[1].margin)
    return chosen, left_out


def _predicted(p) -> dict:
    # The planner's three figures, named as torch and nvidia-smi name them; the CUDA context is outside the
    # caching allocator, so only the nvidia-smi figure counts it.
    return {"fake_world": p.workload.gpus, "verdict": p.verdict, "predicted_live": p.live,
            "predicted_allocator": p.allocated, "predicted_reserved": p.reserved, "predicted_nvml": p.reported}


def stage_replays(ctx: Context, stage: dict, deadline: float, stack: str = "today") -> None:
    if ctx.ops_build is not None and ctx.ops_build.poll() is None:
        stage["notes"].append("The DeepSpeed ops build (a compiler, no GPU memory) was still running.")
    chosen, left_out = replay_candidates(stack)
    if stack == "today":
        # The row with an earlier H100 measurement first, since its allocator history is what the reserve
        # model is checked against; then nearest the card first.
        chosen.sort(key=lambda pair: pair[0].name != SNAPSHOT_ROW)
    stage["left_out"] = [{k: v for k, v in row.items() if k != "prediction"} for row in left_out]
    stage["predictions"] = {row["name"]: row["prediction"] for row in left_out}
    stage["predictions"].update({recipe.name: p.to_dict() for recipe, p in chosen})
    stage["notes"] += [f"Each process is capped at {CARD / GIB:.0f} GiB (--max_gpu_memory), the table's card; NVML "
                       "sees the whole card, not the cap. " + ("Planner: today's stack, one micro-batch per step."
                                                               if stack == "today" else "Planner: the 2023 stack, "
                                                               "the row's accumulation; runs: --stack 2023."),
                       "Errors: measured allocated against the planner's live bytes less its CUDA-context term "
                       "(outside torch's allocator); NVML against the planner's nvidia-smi figure."]
    if ctx.rehearsal:
        # The rows are picked and predicted as on a GPU; what runs is the tiny FSDP recipe's fake-world replay.
        for recipe, p in chosen:
            stage["rows"].append(finish_row({"name": recipe.name, "status": "predicted only (rehearsal)",
                                             **_predicted(p), "checks": {"predicted": p.live > 0}}))
        tiny = recipes.load_recipe(smoke.TINY[0])
        tiny = tiny.model_copy(update={"grad_accum": 1}) if stack == "today" else tiny
        chosen = [(tiny, planner.predict_recipe(tiny, stack, CARD))]
    extra = []  # (label, recipe, prediction, allocator)
    if stack == "today":
        # Named "<row>@<allocator>" in the report; each runs with its own PYTORCH_CUDA_ALLOC_CONF.
        gqa = recipes.load_recipe(GQA_ROW).model_copy(update={"grad_accum": 1})
        for allocator in ALLOCATOR_CONF:
            p = planner.predict_recipe(gqa, stack, CARD, allocator=allocator)
            stage["predictions"][f"{GQA_ROW}@{allocator}"] = p.to_dict()
            if ctx.rehearsal:
                stage["rows"].append(finish_row({"name": f"{GQA_ROW}@{allocator}", "status": "predicted only "
                                                 "(rehearsal)", **_predicted(p), "checks": {"predicted": p.live > 0}}))
            else:
                extra.append((f"{GQA_ROW}@{allocator}", gqa, p, allocator))
    root = ctx.work / "runs" / stage["name"]
    table = reference.load_table()
    # Two steps' worth of examples: the table's 6000 would only cost seconds of data generation per replay.
    def replay(label: str, recipe, folder: Path, env: dict | None = None) -> Run:
        return Run(label, ["-m", "shardkit", "run", recipe.name, "--runner", "native", "--results", str(folder),
                           "--probe", "2", "--gradient_accumulation_steps", str(recipe.accumulation),
                           "--fake_world", str(recipe.gpus), "--stack", stack,
                           "--num_examples", str(2 * recipe.gpus * recipe.batch * recipe.accumulation),
                           "--max_gpu_memory", f"{CARD / GIB:g}"],
                   campaign.row_dir(folder, recipe, 2, campaign.row_stack(["--stack", stack], period=False)),
                   env=env or {})

    runs = [replay(recipe.name, recipe, root) for recipe, _ in chosen]
    runs += [replay(label, recipe, root / allocator, {"PYTORCH_CUDA_ALLOC_CONF": ALLOCATOR_CONF[allocator]})
             for label, recipe, _, allocator in extra]
    snapshot_of = SNAPSHOT_ROW if stack == "today" and not ctx.rehearsal else (runs[0].name if runs else None)
    for run in runs:
        if run.name == snapshot_of:  # on CPU the flag is exercised and makes nothing
            run.argv += ["--memory_snapshot", "True"]
    predictions = {recipe.name: p for recipe, p in chosen} | {label: p for label, _, p, _ in extra}
    # One at a time: each replay's NVML figure must be its own.
    for run in runs:
        (outcome,) = run_all(ctx, stage, [run], deadline)
        doc, p = outcome["results"], predictions[run.name]
        row = {"name": run.name, **_brief(outcome), **_predicted(p), **memory_columns(doc),
               "table": table[run.name].memory_printed if run.name in table else None}
        row["error_allocated"] = _error(row["allocated"], row["predicted_allocator"])
        row["error_reserved"] = _error(row["reserved"], row["predicted_reserved"])
        row["error_nvml"] = _error(row["nvml"], row["predicted_nvml"])
        fake_world = ((doc or {}).get("run") or {}).get("fake_world")
        # At capacity, an out-of-memory under the cap agrees with the planner as much as a run that fits.
        agreeing = ("ok", "oom") if p.verdict == "at capacity" else ("ok",)
        row["checks"] = {"status agrees with the planner's verdict": outcome["status"] in agreeing,
                         "fake world": fake_world == p.workload.gpus, "device": device_check(ctx, doc),
                         **memory_checks(ctx, doc)}
        stage["rows"].append(finish_row(row))
        stage["results"][run.name] = doc
        if "--memory_snapshot" in run.argv:
            keep_snapshot(ctx, stage, run)
        ctx.save()


def keep_snapshot(ctx: Context, stage: dict, run: Run) -> None:
    """The replay's allocator history, compressed, beside the report when it is small enough to come back."""
    import gzip

    found = sorted(run.folder.rglob(results.MEMORY_SNAPSHOT_FILE))
    if not found:
        stage["notes"].append(f"{run.name}: no allocator history was written (none is made without a GPU).")
        return
    target = ctx.out / f"memory-snapshot-{stage['name']}-{run.name}.pickle.gz"
    packed = gzip.compress(found[0].read_bytes(), compresslevel=6)
    if len(packed) > TARBALL_LIMIT:
        stage["notes"].append(f"{run.name}: allocator history {len(packed) / MIB:.1f} MiB compressed, over the "
                              f"{TARBALL_LIMIT / MIB:.0f} MiB that comes back; kept on the GPU machine only.")
        return
    partial = target.with_name(target.name + ".partial")
    partial.write_bytes(packed)
    partial.replace(target)
    stage["snapshot"] = {"row": run.name, "file": target.name, "bytes": len(packed)}
    stage["notes"].append(f"{run.name}: allocator history in {target.name} ({len(packed) / MIB:.1f} MiB, "
                          "torch memory snapshot: pytorch.org/memory_viz).")


def stage_replays_2023(ctx: Context, stage: dict, deadline: float) -> None:
    stage_replays(ctx, stage, deadline, stack="2023")


def _error(measured: int | None, predicted: int | None) -> float | None:
    return measured / predicted - 1 if measured and predicted else None


ENGINE_METHODS = {kind: recipes.method_flags(Parallelism(kind, offload=False)) for kind in ("fsdp", "zero3")}


def layer_shaped(ctx: Context, batch: int, steps: int) -> dict:
    """The one-GPU model of the engines and ZeRO-3 stages: 8 decoder layers of LLaMA-7B's shape at sequence 2048
    on a GPU, the tiny model in a rehearsal."""
    model, layers, seq = ("llama-7b", 8, 2048) if ctx.cuda else ("tiny", None, 64)
    return {"model": model, "layers": layers, "micro_batch": batch, "seq_len": seq, "steps": steps, "ranks": 1}


def layer_shaped_workload(shape: dict, parallelism: Parallelism, attention: str = "eager"):
    w = planner.workload(shape["model"], parallelism, 1, shape["micro_batch"], True, 1, attention, shape["seq_len"])
    return dataclasses.replace(w, shape=dataclasses.replace(w.shape, layers=shape["layers"])) if shape["layers"] else w


def layer_shaped_run(ctx: Context, stage_name: str, name: str, shape: dict, flags: list[str], engine: str) -> Run:
    folder = ctx.work / "runs" / stage_name / name
    layers = ["--num_hidden_layers", str(shape["layers"])] if shape["layers"] else []
    return Run(name, ["-m", "shardkit.train", "--model_name_or_path", shape["model"], "--per_device_train_batch_size",
                      str(shape["micro_batch"]), "--model_max_length", str(shape["seq_len"]), *layers, *flags,
                      "--engine", engine, "--bf16", "True", "--tf32", "True", "--gradient_checkpointing", "True",
                      "--gradient_accumulation_steps", "1", "--max_steps", str(shape["steps"]), "--save_strategy",
                      "no", "--num_examples", "640", "--nproc_per_node", "1", "--output_dir", str(folder),
                      "--run_name", name], folder)


def stage_engines(ctx: Context, stage: dict, deadline: float) -> None:
    shape = layer_shaped(ctx, 4, 10 if ctx.cuda else 4)
    stage["shape"] = shape
    runs, predicted, workloads = [], {}, {}
    for method, flags in ENGINE_METHODS.items():
        w = layer_shaped_workload(shape, Parallelism(method, offload=False))
        workloads[method] = w
        predicted[method] = planner.predict(w, "today", CARD).live
        for engine in ("native", "hf"):
            runs.append(layer_shaped_run(ctx, "engines", f"{method}.{engine}", shape, flags, engine))
    stage["notes"].append("Steady state: the median step after 2 warm-up steps. MFU against the card's datasheet "
                          "dense bf16 peak; 'of matmul' against the bf16 matmul rate each run measured at start. "
                          "Planner: today's stack (the native engine), live bytes; its step time on the card the run "
                          "reports, at the matmul rate the run measured (docs/planner.md), and the measured "
                          "s/step's error against it.")
    steps = shape["steps"]
    for run in runs:
        (outcome,) = run_all(ctx, stage, [run], deadline)
        method, engine = run.name.split(".")
        doc = outcome["results"] or {}
        throughput = doc.get("throughput") or {}
        steady = (doc.get("time") or {}).get("steady_state") or {}
        per_gpu = throughput.get("tokens_per_s_per_gpu")
        model_flops = throughput["model_flops_per_token"] * per_gpu if per_gpu else None
        matmul = (doc.get("environment") or {}).get("matmul_bf16_flops")
        predicted_step = _predicted_step(workloads[method], doc)
        row = {"name": run.name, "method": method, "engine": engine, **_brief(outcome),
               "s_per_step": steady.get("median_s"), "tokens_per_s": throughput.get("tokens_per_s"),
               "model_flops_per_s": model_flops, "mfu": throughput.get("mfu"), "hfu": throughput.get("hfu"),
               "of_matmul": model_flops / matmul if model_flops and matmul else None,
               "predicted_live": predicted[method], "predicted_s_per_step": predicted_step,
               "step_error": steady["median_s"] / predicted_step - 1 if predicted_step and steady.get("median_s")
               else None, **memory_columns(doc)}
        # On CPU HF Trainer would run DDP under --fsdp; the kit refuses (exit 2) before any process starts.
        refusal = ctx.rehearsal and method == "fsdp" and engine == "hf"
        if refusal:
            row["checks"] = {"refused on CPU (exit 2)": outcome["exit_code"] == 2 and doc == {}}
        else:
            row["checks"] = {"status ok": outcome["status"] == "ok",
                             f"{steps} steps": len((doc.get("time") or {}).get("step_times_s") or []) == steps,
                             "tokens/s": bool(row["tokens_per_s"]), "MFU": bool(row["mfu"]) if ctx.cuda else None,
                             "device": device_check(ctx, doc), **memory_checks(ctx, doc)}
        stage["rows"].append(finish_row(row))
        stage["results"][run.name] = outcome["results"]
        ctx.save()
    by_name = {row["name"]: row for row in stage["rows"]}
    for method in ENGINE_METHODS:
        native, hf = by_name.get(f"{method}.native"), by_name.get(f"{method}.hf")
        if native and hf and native["tokens_per_s"] and hf["tokens_per_s"]:
            stage["ratios"].append({"method": method, "tokens_per_s": native["tokens_per_s"] / hf["tokens_per_s"],
                                    **{key: native[key] / hf[key] if native[key] and hf[key] else None
                                       for key in ("allocated", "reserved", "nvml")}})


def _hardware_of(doc: dict):
    """The planner's hardware for the card a run reports, at the matmul rate it measured; None off a known GPU."""
    environment = doc.get("environment") or {}
    return planner.hardware_for((environment.get("gpu") or {}).get("name"), environment.get("matmul_bf16_flops"))


def _predicted_step(w, doc: dict) -> float | None:
    """The planner's step time for this run's card at the matmul rate the run measured; None off a known GPU."""
    hardware = _hardware_of(doc)
    return planner.predict(w, "today", CARD, hardware=hardware).time.step_seconds if hardware else None


def stage_zero3_lead(ctx: Context, stage: dict, deadline: float) -> None:
    """ZeRO-3 + offload on one GPU at a small and a large micro-batch, against the planner's gathered layers
    awaiting the compute stream (docs/planner.md): a layer's fetch from the host against its forward decides
    whether the CPU gets ahead, so the reserved bytes beyond allocated should grow with the batch as predicted.
    SDPA attention: eager attention's score tensors would make the compute stream's fragmentation (the
    planner's uncertainty) larger than the lead itself."""
    parallelism = Parallelism("zero3", offload=True)
    flags = [*recipes.method_flags(parallelism), "--attn_implementation", "sdpa"]
    stage["notes"].append("One rank, native engine, today's stack. Held layers: (max reserved - max allocated) / "
                          "(2 x a layer's parameters), against the planner's lead; the measured figure also holds "
                          "the compute stream's fragmentation, which the planner states as its uncertainty, so the "
                          "check is the measured reserved within the planner's reserved +- that uncertainty. The "
                          "planner's rates are the card's the run reports, at the matmul rate it measured.")
    for batch in (2, 8) if ctx.cuda else (1, 4):
        shape = layer_shaped(ctx, batch, 4 if ctx.cuda else 2)
        stage.setdefault("shapes", []).append(shape)
        w = layer_shaped_workload(shape, parallelism, "sdpa")
        (outcome,) = run_all(ctx, stage, [layer_shaped_run(ctx, "zero3_lead", f"zero3_offload.bs{batch}", shape,
                                                           flags, "native")], deadline)
        doc = outcome["results"] or {}
        hardware = _hardware_of(doc)
        p = planner.predict(w, "today", CARD, hardware=hardware) if hardware else None
        lead = p and p.lead
        memory = memory_columns(doc)
        layer_bytes = 2 * w.shape.layer_params
        held = (memory["reserved"] - memory["allocated"]) / layer_bytes if memory["reserved"] else None
        row = {"name": f"zero3_offload.bs{batch}", "micro_batch": batch, **_brief(outcome),
               "fetch_ms": lead and lead.fetch_s * 1e3, "forward_ms": lead and lead.forward_s * 1e3,
               "predicted_layers": lead and lead.layers, "held_layers": held,
               "predicted_allocated": p and p.allocated, "predicted_reserved": p and p.reserved,
               "uncertainty": p and p.reserve_uncertainty, **memory}
        agrees = None
        if p and memory["reserved"]:
            agrees = abs(memory["reserved"] - p.reserved) <= p.reserve_uncertainty
        row["checks"] = {"status ok": outcome["status"] == "ok", "device": device_check(ctx, doc),
                         **memory_checks(ctx, doc), "reserved within the planner's uncertainty": agrees}
        stage["rows"].append(finish_row(row))
        stage["results"][row["name"]] = outcome["results"]
        ctx.save()


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    budget_s: tuple[float, float]  # on a GPU, in a CPU rehearsal
    reserve_s: float  # kept for this stage by the ones before it
    run: Callable[[Context, dict, float], None]


STAGES = [
    Stage("environment", "Card and software", (45, 90), 10, stage_environment),
    Stage("gpu_tests", "GPU tests (pytest -m gpu)", (60, 120), 15, stage_gpu_tests),
    Stage("tiny", "Tiny recipes on the card", (110, 420), 40, stage_tiny),
    Stage("oom", "Forced out-of-memory", (40, 120), 15, stage_oom),
    Stage("replays", "Fake-world replays of the table's FSDP rows against the planner", (110, 150), 30,
          stage_replays),
    Stage("engines", "LLaMA-7B-layer-shaped model through both engines", (170, 300), 90, stage_engines),
    Stage("zero3_lead", "ZeRO-3 + offload: gathered layers awaiting the compute stream against the planner",
          (150, 150), 0, stage_zero3_lead),
    Stage("replays_2023", "Fake-world replays with the 2023 stack (FSDP1) against the planner and the table",
          (300, 150), 0, stage_replays_2023),
]


def run_stages(ctx: Context, stages: list[Stage]) -> None:
    for index, stage in enumerate(stages):
        record = ctx.report["stages"][index]
        later = sum(s.reserve_s for s in stages[index + 1:])
        now = time.monotonic()
        # The last stage run takes what is left: a second call for one stage gets the whole limit.
        budget = float("inf") if index == len(stages) - 1 else stage.budget_s[ctx.rehearsal]
        deadline = min(now + budget, ctx.deadline - later)
        if deadline - now < 5:
            record["status"] = "not started: the overall deadline came first"
            ctx.save()
            continue
        record.update(status="running", budget_s=round(deadline - now), started_at=_now())
        ctx.log(f"== {stage.name} ({deadline - now:.0f} s)")
        ctx.save()
        try:
            stage.run(ctx, record, deadline)
            record["status"] = "cut short" if record.get("cut_short") else "done"
        except Interrupted:
            record["status"] = "cut short: interrupted"
            raise
        except Exception:
            record["status"] = "failed"
            record["error"] = traceback.format_exc()[-4000:]
            ctx.log(f"{stage.name} failed:\n{record['error']}")
        finally:
            record["seconds"] = round(time.monotonic() - now, 1)
            ctx.log(f"== {stage.name}: {record['status']} in {record['seconds']:.0f} s")
            ctx.save()


# --- the report ---------------------------------------------------------------------------------------------------

def _gib(value) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def _mib(value) -> str:
    return "-" if value is None else f"{value / MIB:.0f}"


def _pct(value, signed: bool = False) -> str:
    return "-" if value is None else (f"{value:+.1%}" if signed else f"{value:.1%}")


def _num(value, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return out + ["| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in row) + " |" for row in rows]


def _failed(row: dict) -> str:
    return ", ".join(k for k, v in row["checks"].items() if v is False) or "ok"


def render(report: dict) -> str:
    probed = any(s["name"] == "environment" and s.get("probe") for s in report["stages"])
    card = report.get("card") or ("no GPU seen" if probed else "card not read yet")
    kind = "rehearsal on CPU, tiny shapes" if report["rehearsal"] else card
    lines = [f"# shardkit GPU acceptance: {kind}", "",
             f"Started {report['started_at']}, last written {report.get('updated_at')}, {report.get('elapsed_s')} s "
             f"of a {report['limit_s']:.0f} s limit. Code: git {report['git_commit'] or 'unknown'}, sources sha256 "
             f"{report['source_sha256'][:16]}. Written by benchmarks/gpu_acceptance.sh from measured calls and "
             "results.json files; the raw figures are in report.json.", ""]
    if report["rehearsal"]:
        lines += ["A rehearsal: the same stages on CPU (gloo, no NVML, tiny shapes); GPU-only figures read '-'.", ""]
    summary = []
    for stage in report["stages"]:
        rows = stage["rows"]
        good = sum(row["ok"] for row in rows)
        summary.append([stage["title"], stage["status"], _num(stage.get("seconds"), ".0f"),
                        _num(stage.get("budget_s"), ".0f"), f"{good} of {len(rows)}"])
    lines += _table(["stage", "status", "seconds", "budget s", "rows passing every check"], summary) + [""]
    for stage in report["stages"]:
        lines += [f"## {stage['title']}", "", f"Status: {stage['status']}."]
        lines += [f"{note}" for note in stage["notes"]]
        lines.append("")
        if stage["status"].startswith("not started") or stage["status"] == "pending":
            continue
        lines += RENDERERS[stage["name"]](stage) + [""]
        for row in stage["rows"]:
            if not row["ok"]:
                lines.append(f"- {row['name']}: failed checks: {_failed(row)}")
                if row.get("log_tail"):
                    lines += ["", "```", row["log_tail"], "```", ""]
        if stage.get("error"):
            lines += ["", "Stage error:", "```", stage["error"], "```"]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _render_environment(stage: dict) -> list[str]:
    p = stage.get("probe")
    if not p:
        return []
    gpu, versions = p.get("gpu") or {}, p["versions"]
    matmul, peak = p["matmul_bf16_flops_8192"], p["peak_bf16_flops"]
    rows = [["card", gpu.get("name", "none")],
            ["memory (torch / NVML total)", f"{_gib(gpu.get('memory_bytes'))} / "
                                            f"{_gib(p['nvml_total_bytes'] if isinstance(p['nvml_total_bytes'], int) else None)} GiB"],
            ["compute capability", gpu.get("compute_capability", "-")], ["driver", p["driver"] or "-"],
            ["CUDA (torch build)", p["cuda"] or "-"], ["torch", p["torch_build"]],
            *[[name, versions.get(name) or "-"] for name in ("transformers", "accelerate", "deepspeed", "pydantic",
                                                             "pydantic_core", "nvidia-ml-py")],
            ["DeepSpeed accelerator", p["deepspeed_accelerator"] or p["deepspeed_error"]],
            ["Python", p["python"]], ["CPU cores / host memory", f"{p['cpu_count']} / {_gib(p['host_memory_bytes'])} GiB"],
            ["nvcc", p["nvcc"] or "-"], ["TORCH_CUDA_ARCH_LIST", p["torch_cuda_arch_list"] or "-"],
            ["bf16 matmul 8192^3, measured", "-" if matmul is None else f"{matmul / 1e12:.0f} TFLOP/s"],
            ["datasheet dense bf16 peak", "-" if peak is None else f"{peak / 1e12:.1f} TFLOP/s"],
            ["measured / datasheet", _pct(matmul / peak if matmul and peak else None)],
            ["carried wheels", p["wheels"]]]
    return _table(["what", "value"], rows)


def _render_gpu_tests(stage: dict) -> list[str]:
    rows = [[r["name"], r["outcome"], f"{r['seconds']:.2f}", r["message"]] for r in stage["rows"]]
    out = _table(["test", "outcome", "seconds", "message"], rows)
    if stage.get("pytest_exit_code"):
        out += ["", f"pytest exited {stage['pytest_exit_code']}:", "```", stage["pytest_tail"], "```"]
    return out


def _render_tiny(stage: dict) -> list[str]:
    rows = [[r["name"], r["method"], r["engine"], r["world"], r["status"], _num(r["seconds"], ".0f"),
             _mib(r["allocated"]), _mib(r["reserved"]), _mib(r["nvml"]), _mib(r["host_rss"]), _failed(r)]
            for r in stage["rows"]]
    out = _table(["run", "method", "engine", "world", "status", "s", "allocated MiB", "reserved MiB", "NVML MiB",
                  "host RSS MiB", "checks"], rows)
    ops = stage.get("ops_build") or {}
    built = ", ".join(f"{' '.join(o['ops'])} {o['status']} ({o['seconds']} s)" for o in ops.get("ops", []))
    return out + ["", f"DeepSpeed ops built ahead: {ops.get('status', '-')}; {built or 'none'}."]


def _render_oom(stage: dict) -> list[str]:
    rows = [[r["status"], _num(r["exit_code"], "d"), r["failure_device"] or "-", _num(r["failure_step"], "d"),
             _num(r["bytes_asked"]), _num(r["bytes_requested"]), _gib(r["cap_bytes"]), _mib(r["allocated"]),
             _mib(r["reserved"]), _mib(r["nvml"]), _mib(r["host_rss"]), _failed(r)] for r in stage["rows"]]
    out = _table(["status", "exit", "device", "step", "bytes asked", "bytes in the error", "cap GiB",
                  "allocated MiB", "reserved MiB", "NVML MiB", "host RSS MiB", "checks"], rows)
    return out + ["", f"Message: {stage['rows'][0]['message']}"] if stage["rows"] else out


def _render_replays(stage: dict) -> list[str]:
    rows = [[r["name"], r["fake_world"], r.get("table") or "-", r["verdict"], r["status"], _gib(r["predicted_allocator"]),
             _gib(r.get("allocated")), _pct(r.get("error_allocated"), True), _gib(r.get("predicted_reserved")),
             _gib(r.get("reserved")), _pct(r.get("error_reserved"), True),
             _gib(r["predicted_nvml"]), _gib(r.get("nvml")), _pct(r.get("error_nvml"), True), _failed(r)]
            for r in stage["rows"]]
    out = _table(["row", "ranks", "table", "planner verdict", "status", "planner allocated GiB", "allocated GiB",
                  "error", "planner reserved GiB", "reserved GiB", "error", "planner nvidia-smi GiB", "NVML GiB",
                  "error", "checks"], rows)
    if stage.get("left_out"):
        out += ["", "Not replayed: " + "; ".join(f"{r['name']} ({r['why']})" for r in stage["left_out"]) + "."]
    return out


def _render_engines(stage: dict) -> list[str]:
    shape = stage.get("shape") or {}
    out = [f"Model {shape.get('model')} ({shape.get('layers') or 'all'} layers), micro-batch {shape.get('micro_batch')}, "
           f"sequence {shape.get('seq_len')}, bf16, tf32, checkpointing, {shape.get('steps')} steps, "
           f"{shape.get('ranks')} rank.", ""]
    rows = [[r["name"], r["status"], _num(r["s_per_step"], ".3f"), _num(r.get("predicted_s_per_step"), ".3f"),
             _pct(r.get("step_error"), True), _num(r["tokens_per_s"]),
             _num(r["model_flops_per_s"] and r["model_flops_per_s"] / 1e12, ".0f"), _pct(r["mfu"]), _pct(r["hfu"]),
             _pct(r["of_matmul"]), _gib(r["predicted_live"]), _gib(r["allocated"]), _gib(r["reserved"]),
             _gib(r["nvml"]), _failed(r)] for r in stage["rows"]]
    out += _table(["run", "status", "s/step", "planner s/step", "error", "tokens/s", "model TFLOP/s", "MFU", "HFU",
                   "of matmul", "planner live GiB", "allocated GiB", "reserved GiB", "NVML GiB", "checks"], rows)
    if stage["ratios"]:
        out += ["", "Native over HF Trainer, same method:", ""]
        out += _table(["method", "tokens/s", "allocated", "reserved", "NVML"],
                      [[r["method"], *(_num(r[k], ".2f") for k in ("tokens_per_s", "allocated", "reserved", "nvml"))]
                       for r in stage["ratios"]])
    return out


def _render_zero3_lead(stage: dict) -> list[str]:
    rows = [[r["name"], r["status"], _num(r["fetch_ms"], ".1f"), _num(r["forward_ms"], ".1f"),
             _num(r["predicted_layers"], ".1f"), _num(r["held_layers"], ".1f"), _gib(r["predicted_allocated"]),
             _gib(r["allocated"]), _gib(r["predicted_reserved"]), _gib(r["uncertainty"]), _gib(r["reserved"]),
             _failed(r)] for r in stage["rows"]]
    return _table(["run", "status", "fetch per layer (ms)", "forward per layer (ms)", "planner lead (layers)",
                   "held (layers)", "planner allocated GiB", "allocated GiB", "planner reserved GiB",
                   "uncertainty GiB", "reserved GiB", "checks"], rows)


RENDERERS = {"environment": _render_environment, "gpu_tests": _render_gpu_tests, "tiny": _render_tiny,
             "oom": _render_oom, "replays": _render_replays, "engines": _render_engines,
             "replays_2023": _render_replays, "zero3_lead": _render_zero3_lead}


# --- entry point --------------------------------------------------------------------------------------------------

def source_sha256() -> str:
    """Which code ran, where the copy on the GPU machine has no git history: the package, tests, recipes and
    benchmarks, file by file."""
    digest = hashlib.sha256()
    for top in ("src", "tests", "recipes", "benchmarks"):
        for path in sorted((ROOT / top).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def new_report(stages: list[Stage], rehearsal: bool, limit_s: float) -> dict:
    from shardkit.engine.environment import git_commit

    return {"rehearsal": rehearsal, "started_at": _now(), "limit_s": limit_s, "card": None,
            "git_commit": git_commit(), "source_sha256": source_sha256(),
            "stages": [{"name": s.name, "title": s.title, "status": "pending", "rows": [], "notes": [],
                        "results": {}, "ratios": []} for s in stages]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="report.md, report.json and runs.tgz go here")
    parser.add_argument("--work", type=Path, help="the runs' folders")
    parser.add_argument("--limit-s", type=float, default=400, help="the whole check's deadline, in seconds")
    parser.add_argument("--rehearsal", action="store_true", help="on CPU: tiny shapes, gloo, no NVML")
    parser.add_argument("--stages", default=",".join(s.name for s in STAGES), help="a comma-separated subset")
    parser.add_argument("--probe-environment", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--build-ops", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe_environment:
        print(json.dumps(probe_environment(), default=str))
        return 0
    if args.build_ops:
        build_ops()
        return 0
    if args.out is None or args.work is None:
        parser.error("--out and --work are required")
    names = args.stages.split(",")
    unknown = set(names) - {s.name for s in STAGES}
    if unknown:
        parser.error(f"unknown stage(s) {sorted(unknown)}; stages: {', '.join(s.name for s in STAGES)}")
    stages = [s for s in STAGES if s.name in names]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.work / "runs").mkdir(parents=True, exist_ok=True)
    report = new_report(stages, args.rehearsal, args.limit_s)
    ctx = Context(args.rehearsal, args.out, args.work, time.monotonic() + args.limit_s, report)

    def interrupted(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupted)
    if any(s.name in ("tiny", "engines", "zero3_lead") for s in stages):
        with open(args.work / "runs" / "ops-build.log", "w") as log:
            ctx.ops_build = subprocess.Popen([sys.executable, __file__, "--build-ops"], cwd=ROOT, stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        run_stages(ctx, stages)
    except Interrupted:
        ctx.log("interrupted: the report keeps what was done")
    finally:
        if ctx.ops_build is not None and ctx.ops_build.poll() is None:
            _kill_tree(ctx.ops_build)
        ctx.save()
    passed = all(s["status"] == "done" and all(r["ok"] for r in s["rows"]) for s in report["stages"])
    ctx.log(f"acceptance {'passed' if passed else 'NOT passed'}: {args.out / 'report.md'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
