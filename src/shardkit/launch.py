"""Starts the ranks (torchrun's elastic agent, in-process) when shardkit is not already under torchrun,
and turns their ending into one results file and one exit code: 0 ok, 1 error, 2 usage, 3 oom.

It owns the run's wall time from launch to the last rank's exit (the table's Time column)."""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

from . import results
from .failures import describe_signal_death

# Flags the launcher consumes; the ranks get the rest of the command line unchanged.
_LAUNCH_FLAGS = ("--nproc_per_node", "--nnodes", "--node_rank", "--rdzv_endpoint")


def worker_argv(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in _LAUNCH_FLAGS:
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def launch(argv: list[str], options, cfg, plan) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    started = time.time()
    os.environ["SHARDKIT_LAUNCH_TIME"] = repr(started)
    if (options.nproc_per_node or 1) > 1:
        # What the torchrun command (the seed's launcher) does; without it every rank starts one OpenMP
        # thread per core and N ranks oversubscribe the CPU (measured: 6x slower tiny ZeRO-3 steps).
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    multi_node = options.nnodes > 1 or options.rdzv_endpoint
    # Every node's launcher must name the same rendezvous (torchrun's --rdzv-id); one node can use any.
    run_id = os.environ.get("SHARDKIT_RUN_ID") or (f"shardkit-{cfg.run_name or 'run'}" if multi_node
                                                   else uuid.uuid4().hex[:12])
    config = LaunchConfig(min_nodes=options.nnodes, max_nodes=options.nnodes,
                          nproc_per_node=options.nproc_per_node or 1, run_id=run_id, rdzv_backend="c10d",
                          rdzv_endpoint=options.rdzv_endpoint if multi_node else "localhost:0",
                          max_restarts=0, monitor_interval=0.1)
    failures = {}
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "shardkit.train", *worker_argv(argv))
    except ChildFailedError as error:
        failures = {rank: failure.exitcode for rank, failure in error.failures.items()}
    except KeyboardInterrupt:
        failures = {"all": -2}
    if options.node_rank != 0:
        # Global rank 0, on the first node, writes the results; the other nodes report only their own ranks.
        return 1 if failures else 0
    return finish(cfg, plan, started, failures)


def finish(cfg, plan, started: float, failures: dict) -> int:
    """Stamp the launcher's wall time into the ranks' results, or write results for ranks that died
    without writing any (killed by a signal)."""
    path = Path(cfg.output_dir) / results.RESULTS_FILE
    if not path.is_file():
        rank, exitcode = next(iter(failures.items()), (None, 1))
        failure = describe_signal_death(exitcode) or {"kind": "error", "device": None, "bytes_requested": None,
                                                      "message": f"exited with code {exitcode} without results"}
        failure.update(rank=rank, step=None)
        return write_failure(cfg, plan, started, failure)
    document = results.read_json(path)
    document["time"]["wall_time_s"] = time.time() - started
    document["time"]["wall_time_source"] = "launcher"
    results.write_json_atomic(path, document)
    return document["exit_code"]


def write_failure(cfg, plan, started: float, failure: dict) -> int:
    """Results for a run whose ranks could not write any (killed, timed out)."""
    status = "oom" if failure["kind"] == "oom" else "error"
    now = time.time()
    document = results.build(status=status, cfg=cfg, plan=plan, record={}, per_rank=[], environment=None,
                             data_info=None, failure=failure, launch_time=started, now=now)
    document["time"]["wall_time_source"] = "launcher"
    results.write_json_atomic(Path(cfg.output_dir) / results.RESULTS_FILE, document)
    return document["exit_code"]
