"""Starts the ranks (torchrun's elastic agent, in-process) when shardkit is not already under torchrun,
and turns their ending into one results file and one exit code: 0 ok, 1 error, 2 usage, 3 oom.

It owns the run's wall time from launch to the last rank's exit (the table's Time column).
``python -m shardkit.engine.launch CONFIG_JSON`` launches an already resolved run (what a campaign's row
process does)."""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from ..results import document as results
from ..results.failure import Failure
from ..results.files import read_json, write_json_atomic
from .failures import describe_signal_death

if TYPE_CHECKING:
    from ..spec.resolve import ResolvedRun


def config_path(run: ResolvedRun) -> Path:
    return Path(run.config.output_dir) / results.CONFIG_FILE


def write_config(run: ResolvedRun, launched_at: float | None = None) -> Path:
    """The resolved run, where the ranks read it and where it stays beside the results; ``launched_at``
    starts the run's wall time for the ranks."""
    path = config_path(run)
    write_json_atomic(path, {**run.to_dict(), "adaptations": [], "launched_at": launched_at})
    return path


def launch(run: ResolvedRun) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    started = time.time()
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
    failures: dict = {}
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "shardkit.engine.rank",
                                                                  str(write_config(run, started)))
    except ChildFailedError as error:
        failures = {rank: failure.exitcode for rank, failure in error.failures.items()}
    except KeyboardInterrupt:
        failures = {None: -2}
    if options.node_rank != 0:
        # Global rank 0, on the first node, writes the results; the other nodes report only their own ranks.
        return 1 if failures else 0
    return finish(run, started, failures)


def finish(run: ResolvedRun, started: float, failures: dict) -> int:
    """Stamp the launcher's wall time into the ranks' results, or write results for ranks that died
    without writing any (killed by a signal)."""
    path = Path(run.config.output_dir) / results.RESULTS_FILE
    if not path.is_file():
        rank, exitcode = next(iter(failures.items()), (None, 1))
        failure = describe_signal_death(exitcode, rank) or Failure(
            kind="error", rank=rank, message=f"exited with code {exitcode} without results")
        return write_failure(run, started, failure)
    document = read_json(path)
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
    from ..spec.resolve import ResolvedRun

    return launch(ResolvedRun.from_dict(read_json((argv or sys.argv[1:])[0])))


if __name__ == "__main__":
    sys.exit(main())
