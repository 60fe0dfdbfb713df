"""Starts the ranks (torchrun's elastic agent, in-process) when shardkit is not already under torchrun,
and turns their ending into one results file and one exit code: 0 ok, 1 error, 2 usage, 3 oom.

It owns the run's wall time from launch to the last rank's exit (the table's Time column).
``python -m shardkit.engine.launch CONFIG_JSON`` launches an already resolved run (what a campaign's row
process does)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import EXIT_USAGE
from ..results import document as results
from ..results.failure import Failure
from ..results.files import read_json, write_json_atomic
from ..results.lock import folder_lock
from .failures import describe_signal_death, oom_kill_count

if TYPE_CHECKING:
    from ..spec.resolve import ResolvedRun


def config_path(run: ResolvedRun) -> Path:
    """config.json; another node's launcher writes its own file, since the folder may be shared."""
    node = run.launch.node_rank
    name = results.CONFIG_FILE if node == 0 else f"config-node{node}.json"
    return Path(run.config.output_dir) / name


def write_config(run: ResolvedRun, launched_at: float | None = None) -> Path:
    """The resolved run, where the ranks read it and where it stays beside the results; ``launched_at``
    starts the run's wall time for the ranks."""
    path = config_path(run)
    write_json_atomic(path, {**run.to_dict(), "adaptations": [], "launched_at": launched_at})
    return path


def launch(run: ResolvedRun, lock: bool = True) -> int:
    """Runs the resolved run to its end and returns its exit code. ``lock``: hold the output folder's lock
    (a campaign that already holds it for this row passes False). Only the first node holds it and clears
    the folder: the other nodes' launchers may share it, as part of the same run."""
    if not lock or run.launch.node_rank != 0:
        return _launch(run)
    with folder_lock(Path(run.config.output_dir), f"shardkit run {run.config.run_name or ''}".rstrip()):
        return _launch(run)


def _launch(run: ResolvedRun) -> int:
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from .deepspeed_ops import prebuild
    from .rank import clear_stale

    prebuild(run)
    started = time.time()
    if run.launch.node_rank == 0:
        clear_stale(Path(run.config.output_dir))
    # The agent logs each rank's ending and each signal; the run's result and its one line say it better.
    for name in [*logging.root.manager.loggerDict, "torch.distributed.elastic"]:
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    if run.config.engine == "native" and run.config.stack == "today":
        # As torchtitan's launcher does: expandable segments keep the compute stream's pool from fragmenting
        # (the planner's reserve uncertainty). The user's own configuration wins; the 2023 stack keeps
        # torch 2.0's only allocator. Set before any CUDA allocation, so the ranks and this process see it.
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if run.plan.fake_world:  # this process is the one rank; its wall time is the launcher's
        from .rank import run_rank

        write_config(run, started)
        return run_rank(run, rank=0, local_rank=0, started=started)
    options = run.launch
    if options.nproc_per_node > 1:
        # What the torchrun command (the seed's launcher) does; without it every rank starts one OpenMP
        # thread per core and N ranks oversubscribe the CPU (measured: 6x slower tiny ZeRO-3 steps).
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Every node's launcher must name the same rendezvous (torchrun's --rdzv-id); one node can use any.
    run_id = os.environ.get("SHARDKIT_RUN_ID") or (f"shardkit-{run.config.run_name or 'run'}" if options.multi_node
                                                   else uuid.uuid4().hex[:12])
    config = LaunchConfig(min_nodes=options.nnodes, max_nodes=options.nnodes,
                          nproc_per_node=options.nproc_per_node, run_id=run_id, rdzv_backend="c10d",
                          rdzv_endpoint=options.rdzv_endpoint if options.multi_node else "localhost:0",
                          max_restarts=0, monitor_interval=0.1)
    oom_before = oom_kill_count()
    ended: list[tuple[int, int]] = []  # (rank, exit code), first failure first
    interrupted = False
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "shardkit.engine.rank",
                                                          str(write_config(run, started)))
    except ChildFailedError as error:
        ended = [(rank, failure.exitcode) for rank, failure in
                 sorted(error.failures.items(), key=lambda item: (item[1].timestamp, item[0]))]
    except (SignalException, KeyboardInterrupt):
        # The agent has passed the signal on to the ranks, which record an interrupted run themselves.
        interrupted = True
    if options.node_rank != 0:
        # Global rank 0, on the first node, writes the results; the other nodes report only their own ranks.
        return 1 if ended or interrupted else 0
    return finish(run, started, ended, (oom_before, oom_kill_count()), interrupted)


def _heartbeats(output: Path) -> dict[int, tuple[int, float]]:
    from .rank import HEARTBEATS

    found = {}
    for path in (output / HEARTBEATS).glob("rank*"):
        try:
            step, at, _ = path.read_text().split()
            found[int(path.name.removeprefix("rank"))] = (int(step), float(at))
        except (OSError, ValueError):
            continue
    return found


def _laggard(run: ResolvedRun) -> Failure | None:
    """A rank whose heartbeat fell behind its peers' (stopped, or stuck outside any collective)."""
    beats = _heartbeats(Path(run.config.output_dir))
    if not beats:
        return None
    last = {rank: beats.get(rank, (0, 0.0)) for rank in range(run.plan.world_size)}
    behind = min(last, key=lambda rank: last[rank])
    ahead = max(step for step, _ in last.values())
    if last[behind][0] >= ahead:
        return None
    return Failure(kind="timeout", rank=behind, step=last[behind][0] + 1, evidence="the ranks' heartbeats",
                   message=f"rank {behind} stalled after step {last[behind][0]} while its peers reached step {ahead} "
                           "and waited on it past --collective_timeout_s")


def root_cause(run: ResolvedRun, ended: list[tuple[int, int]], oom_kills, recorded: dict) -> Failure | None:
    """What ended the job, when no rank could say it itself. After a collective timed out: the rank whose
    heartbeat fell behind, else one that did not answer the agent's SIGTERM and had to be killed (a stopped
    or hung rank; its SIGKILL came after the timeout, so it is no cause of its own). After a peer vanished:
    the first rank killed by a signal (an OOM only with the kernel's evidence)."""
    if recorded.get("kind") == "timeout":
        hung = next((rank for rank, code in ended if code == -signal.SIGKILL), None)
        return _laggard(run) or (None if hung is None else Failure(
            kind="timeout", rank=hung, step=recorded.get("step"), evidence="it did not answer SIGTERM",
            message=f"rank {hung} stalled: its peers waited on it past --collective_timeout_s, and it did not "
                    "answer SIGTERM"))
    deaths = (describe_signal_death(code, rank, oom_kills, recorded.get("step")) for rank, code in ended)
    return next((death for death in deaths if death is not None), None) or _laggard(run)


def finish(run: ResolvedRun, started: float, ended: list[tuple[int, int]], oom_kills=(None, None),
           interrupted: bool = False) -> int:
    """Stamp the launcher's wall time into the ranks' results; where a rank's failure was only the
    consequence of another's (a peer gone, a collective timed out, the job ending around it), or where no
    rank could write (killed), write the cause instead, keeping what the run recorded."""
    path = Path(run.config.output_dir) / results.RESULTS_FILE
    document = read_json(path) if path.is_file() else None
    if document is None and any(code == EXIT_USAGE for _, code in ended):
        return EXIT_USAGE  # a rank found bad input and said so in one line: no run to record
    recorded = (document or {}).get("failure") or {}
    consequence = recorded.get("caused_by_peer") or (recorded.get("kind") == "interrupted" and not interrupted)
    if ended and (document is None or consequence):
        cause = root_cause(run, ended, oom_kills, recorded)
        if cause is None and document is None:
            rank, exitcode = ended[0]
            cause = Failure(kind="error", rank=rank, message=f"exited with code {exitcode} without results")
        if cause is not None:
            if recorded.get("message"):
                cause.message += f"; rank {recorded.get('rank')} then reported: {recorded['message']}"
            where = f"rank {cause.rank}" + (f", step {cause.step}" if cause.step else "")
            print(f"shardkit: {cause.status}: {where}: {cause.message}", file=sys.stderr, flush=True)
            if document is None:
                return write_failure(run, started, cause)
            document = results.with_failure(document, cause)
    if document is None:
        cause = Failure(kind="interrupted", message="interrupted before any rank wrote results") if interrupted \
            else Failure(kind="error", message="the ranks ended without writing results")
        return write_failure(run, started, cause)
    document["time"]["wall_time_s"] = time.time() - started
    document["time"]["wall_time_source"] = "launcher"
    write_json_atomic(path, document)
    return document["exit_code"]


def write_failure(run: ResolvedRun, started: float, failure: Failure) -> int:
    """Results for a run whose ranks could not write any (killed, timed out)."""
    document = results.document(status=failure.status, run=run, recorder=None, per_rank=[], environment=None,
                                data_info=None, failure=failure, launch_time=started, now=time.time())
    document["time"]["wall_time_source"] = "launcher"
    write_json_atomic(Path(run.config.output_dir) / results.RESULTS_FILE, document)
    return document["exit_code"]


def main(argv: list[str] | None = None) -> int:
    """A campaign's row: the campaign holds the folder's lock and wrote the resolved run."""
    from ..spec.resolve import ResolvedRun

    return launch(ResolvedRun.from_dict(read_json((argv or sys.argv[1:])[0])), lock=False)


if __name__ == "__main__":
    sys.exit(main())
