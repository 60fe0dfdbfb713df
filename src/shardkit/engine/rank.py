"""One rank of a run: set up, train, gather, and write the results, whatever happens.

On failure the failing rank writes the results (status oom or error) itself and leaves at once with the
matching exit code; the launcher then stops the other ranks, so nobody waits on a collective that will
never complete.

``python -m shardkit.engine.rank CONFIG_JSON`` is how the launcher starts a rank: the resolved run comes
from the file the launcher wrote, rank and world from torchrun's variables, read once here."""

from __future__ import annotations

import datetime
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ..errors import EXIT_USAGE, UsageError
from ..results import document as results
from ..results.failure import Failure
from ..results.files import read_json, write_json_atomic
from ..results.record import Recorder
from .failures import Interrupted, classify
from .measure import MemoryMonitor, matmul_bf16_flops

if TYPE_CHECKING:
    from ..spec.resolve import ResolvedRun


def launch_time() -> float:
    """When an outside torchrun (our parent) started; shardkit's own launcher says so in config.json."""
    try:
        import psutil

        return psutil.Process(os.getppid()).create_time()
    except Exception:  # no parent information: fall back to this process's own start
        return time.time() - time.process_time()


FAILURE_CLAIM = ".failure-claimed"
HEARTBEATS = ".heartbeats"
ENDING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
"""Signals that end a run as an interruption, like SIGINT (which arrives as KeyboardInterrupt)."""


def quiet_known_warnings() -> None:
    """Warnings about other libraries' code, not about the run, each repeated on every step of every rank:
    DeepSpeed 0.19 calls torch's deprecated collective names; FSDP2 on a CPU mesh warns that DTensor's random
    ops may be incomplete there, which is what initializing the shards uses, but the tiny loss curves, which
    start from those weights, are bit-identical from run to run and against the committed reference."""
    import warnings

    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` "
                            r"is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message="DTensor random operators may not have complete support on cpu",
                            category=UserWarning)
    # FSDP1's state-dict code (--stack 2023 checkpoints) calls torch's own deprecated device lookup, per tensor.
    warnings.filterwarnings("ignore", message="`_get_pg_default_device` will be deprecated", category=UserWarning)
    warnings.filterwarnings("ignore", message="Multiple backends are registered with this ProcessGroup",
                            category=UserWarning)
    warnings.filterwarnings("ignore", message="Please use DTensor instead and we are deprecating ShardedTensor",
                            category=FutureWarning)


def _gone(parent: int, wait_s: float = 0.5) -> bool:
    """Whether the launcher has died: this rank was re-parented, or the launcher is a zombie or gone. The
    death signal can arrive a moment before either shows, so look again for a short while."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with open(f"/proc/{parent}/stat") as stat:
                dead = stat.read().rsplit(")", 1)[-1].split()[0] in ("Z", "X")
        except OSError:
            dead = True
        if dead or os.getppid() != parent:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def die_with_launcher(parent: int) -> None:
    """torchrun starts each rank in a session of its own, so nothing ends a rank whose launcher was killed:
    ask the kernel for SIGTERM when the parent dies (Linux's PR_SET_PDEATHSIG), and on SIGTERM leave as an
    interrupted run with the steps done. SIGHUP too: a closed terminal reaches torchrun's agent, which passes
    the signal it got on to the ranks, and a rank that died of it left its peers with a broken pipe."""
    def on_sigterm(signum, frame):
        for ending in ENDING_SIGNALS:  # the first one ends the run; a second must not cut it short
            signal.signal(ending, signal.SIG_IGN)
        raise Interrupted(signum, launcher_gone=_gone(parent))

    for ending in ENDING_SIGNALS:
        signal.signal(ending, on_sigterm)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):  # not Linux: the launcher's own shutdown still ends its ranks
        return
    if os.getppid() != parent:  # the launcher died before the request was in place
        raise Interrupted(signal.SIGTERM, launcher_gone=True)


def heartbeat(output: Path, rank: int, step: int) -> None:
    """Where each rank last was, for the launcher to name a rank that stalled: one small file per rank,
    replaced (not fsynced: a lost heartbeat costs nothing)."""
    folder = output / HEARTBEATS
    tmp = folder / f".rank{rank}.tmp"
    try:
        folder.mkdir(exist_ok=True)
        tmp.write_text(f"{step} {time.time()!r} {os.getpid()}\n")
        tmp.replace(folder / f"rank{rank}")
    except OSError:  # a full disk must not end a run that is otherwise fine
        pass


@dataclass
class RankState:
    """What a rank has so far: enough to write a partial result if the next phase fails."""

    run: ResolvedRun
    rank: int
    started: float
    recorder: Recorder
    launched_by_shardkit: bool = True
    environment: dict | None = None
    data_info: dict | None = None
    memory: MemoryMonitor | None = None

    @property
    def output(self) -> Path:
        return Path(self.run.config.output_dir)


def _device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _cap_gpu_memory(device: torch.device, limit_gib: float | None) -> int | None:
    """--max_gpu_memory: the bytes this process's caching allocator may hold, or None (no cap, or no GPU)."""
    if limit_gib is None or device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, limit_gib * 2**30 / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return int(fraction * total)


def setup(state: RankState, local_rank: int) -> torch.device:
    """Device, process group, the configuration file, the environment and the memory monitor."""
    run, cfg, plan = state.run, state.run.config, state.run.plan
    device = _device(local_rank)
    memory_cap = _cap_gpu_memory(device, cfg.max_gpu_memory)
    if plan.deepspeed_config is not None and device.type == "cpu":
        from ..spec.deepspeed_config import adapt_to_cpu

        state.recorder.cpu_adaptations = adapt_to_cpu(plan.deepspeed_config)
    if plan.fake_world:
        # torchtitan's dry-run store: a process group whose collectives return at once.
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=plan.world_size)
    else:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=cfg.collective_timeout_s))
    if state.rank == 0:
        if not state.launched_by_shardkit:
            clear_stale(state.output)  # under an outside torchrun no launcher has done it
        write_json_atomic(state.output / results.CONFIG_FILE,
                          {**run.to_dict(), "adaptations": state.recorder.cpu_adaptations,
                           "launched_at": state.started})
    dist.barrier()
    if cfg.tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    from .environment import capture

    state.environment = capture(plan.world_size)
    state.environment["matmul_bf16_flops"] = matmul_bf16_flops()
    state.environment["gpu_memory_cap_bytes"] = memory_cap
    state.memory = MemoryMonitor(cfg.nvml_sample_interval_s)  # after the matmul probe: its buffers don't count
    return device


def train(state: RankState, device: torch.device) -> dict | None:
    """Trains with the run's engine; returns what this rank holds (None for HF Trainer)."""
    from .data import build_dataset

    run = state.run
    dataset = build_dataset(run.config, run.plan.model, run.plan.seq_len)
    state.data_info = dataset.info
    if run.plan.engine == "hf":
        from .hf_trainer import run_trainer

        run_trainer(run, state.rank, device, dataset, state.recorder, state.memory)
        return None
    from .loop import run_loop
    from .measure import allocator_history
    from .strategy import build_strategy

    snapshot = state.output / results.MEMORY_SNAPSHOT_FILE if run.config.memory_snapshot and state.rank == 0 else None
    with allocator_history(snapshot, device):  # from before the model exists, so every segment is in it
        strategy = build_strategy(run, device)
        run_loop(strategy, dataset, run, state.rank, device, state.recorder, state.memory)
    return strategy.holdings()


def _summarize(holdings: dict | None) -> dict | None:
    if holdings is None:
        return None
    params = holdings["parameters"].values()
    return {"param_elements_local": sum(p["local"] for p in params),
            "param_elements_global": sum(p["global"] for p in params),
            "optimizer_state_bytes": holdings["optimizer_state_bytes"], "gradient_bytes": holdings["gradient_bytes"],
            "master_bytes": holdings.get("master_bytes"),
            "unsharded_gradient_bytes": holdings.get("unsharded_gradient_bytes"),
            "load_copy_bytes": holdings.get("load_copy_bytes")}


def gather(state: RankState, holdings: dict | None) -> None:
    """Every rank's peaks and holdings to rank 0, which writes sharding.json and the results."""
    plan = state.run.plan
    mine = {"rank": state.rank, "memory": state.memory.close(), "holdings": _summarize(holdings)}
    if plan.fake_world:  # one rank: the fake group would hand back N copies of it
        gathered = [(mine, holdings)]
    else:
        gathered = [None] * plan.world_size
        dist.all_gather_object(gathered, (mine, holdings))
    if state.rank != 0:
        return
    if holdings is not None:
        # Per parameter and rank: what each rank holds of it (the planner's ground truth).
        write_json_atomic(state.output / results.SHARDING_FILE,
                          {"per_rank": [{"rank": entry["rank"], **held} for entry, held in gathered]})
    document = results.document(status="ok", run=state.run, recorder=state.recorder,
                                per_rank=[entry for entry, _ in gathered], environment=state.environment,
                                data_info=state.data_info, failure=None, launch_time=state.started,
                                now=time.time())
    write_json_atomic(state.output / results.RESULTS_FILE, document)


def clear_stale(output: Path) -> None:
    """A previous run's outcome in this folder must not pass for this one's."""
    for stale in [output / results.RESULTS_FILE, output / FAILURE_CLAIM, *output.glob("error-rank*.log"),
                  *(output / HEARTBEATS).glob("rank*")]:
        stale.unlink(missing_ok=True)


def _claim_first_failure(output: Path) -> bool:
    """Only the first rank to fail writes the run's result: a later rank's failure is most often a
    consequence (the job ending around it) and must not overwrite the cause."""
    try:
        os.close(os.open(output / FAILURE_CLAIM, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        return True
    except FileExistsError:
        return False


def fail(state: RankState, error: BaseException) -> int:
    """This rank's failure as the run's result, with its peaks up to the failure (a CUDA OOM's reserved
    memory is the interesting figure), unless another rank failed first; returns the exit code. Bad input
    that only a rank could find is what it is everywhere: one line, exit code 2, no results."""
    if isinstance(error, UsageError):
        if _claim_first_failure(state.output):
            print(f"shardkit: error: {error}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    failure: Failure = classify(error, state.rank, state.recorder.current_step)
    log = state.output / f"error-rank{state.rank}.log"
    state.output.mkdir(parents=True, exist_ok=True)
    log.write_text("".join(traceback.format_exception(error)))
    failure.traceback_file = str(log)
    code = results.STATUS_EXIT_CODES[failure.status]
    if not _claim_first_failure(state.output):
        return code
    mine = {"rank": state.rank, "memory": state.memory.close() if state.memory is not None else None,
            "holdings": None}
    document = results.document(status=failure.status, run=state.run, recorder=state.recorder, per_rank=[mine],
                                environment=state.environment, data_info=state.data_info, failure=failure,
                                launch_time=state.started, now=time.time())
    write_json_atomic(state.output / results.RESULTS_FILE, document)
    where = f"rank {state.rank}, step {failure.step}" if failure.step else f"rank {state.rank}, before training"
    asked = f", {failure.bytes_requested:,} bytes requested" if failure.bytes_requested else ""
    print(f"shardkit: {failure.status}: {where}{asked}: {failure.message} (traceback: {log})", file=sys.stderr,
          flush=True)
    return code


def run_rank(run: ResolvedRun, rank: int, local_rank: int, started: float, launched_by_shardkit: bool = True,
             parent: int | None = None) -> int:
    """Never returns: leaves the process with the run's exit code once the results are written."""
    quiet_known_warnings()
    state = RankState(run, rank, started, Recorder(), launched_by_shardkit)
    state.recorder.on_step = lambda step: heartbeat(state.output, rank, step)
    try:
        if parent is not None:
            die_with_launcher(parent)
        device = setup(state, local_rank)
        gather(state, train(state, device))
        dist.barrier()
        dist.destroy_process_group()  # DeepSpeed's CPU comm aborts the interpreter at exit without it
        code = 0
    except BaseException as error:  # noqa: BLE001 - every failure becomes a result, then a prompt exit
        # The launcher signals every rank once one has failed, sometimes more than once: a signal now must
        # not interrupt the writing of this rank's result (it ended once in a traceback instead).
        for ending in (*ENDING_SIGNALS, signal.SIGINT):
            signal.signal(ending, signal.SIG_IGN)
        code = fail(state, error)
    # Leave without the interpreter's teardown, which sometimes aborted a rank whose work was done and
    # written ("terminate called without an active exception": 3 of 41 two-launcher CPU runs, 0 of 40
    # since); most likely the gloo group, still referenced by the model's device mesh, destroyed late.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    from ..spec.resolve import ResolvedRun

    parent = os.getppid()  # before anything slow: the launcher may die while this rank starts
    written = read_json((argv or sys.argv[1:])[0])
    run = ResolvedRun.from_dict(written)
    # torchrun's protocol: each rank learns its place from these variables, read here once.
    return run_rank(run, int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)),
                    written.get("launched_at") or launch_time(), parent=parent)


if __name__ == "__main__":
    sys.exit(main())
