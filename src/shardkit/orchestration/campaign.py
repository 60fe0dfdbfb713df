"""Running recipes: one row (``shardkit run``) or many (``shardkit reproduce``), each row in its own process
with a time limit, its results written atomically as it finishes, finished rows skipped on resume."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from ..results.document import RESULTS_FILE
from ..results.failure import Failure
from ..results.files import read_json
from ..results.lock import folder_lock
from ..spec import recipes
from ..spec.presets import preset_name
from .row import Row, record_failure


def visible_gpu_memory() -> list[int]:
    """Total memory of each GPU this process can use; through NVML when the local torch is a CPU build
    (containers bring their own CUDA torch)."""
    import torch

    if torch.cuda.is_available():
        return [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]
    try:
        import pynvml

        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        return [pynvml.nvmlDeviceGetMemoryInfo(h).total for h in handles]
    except Exception:  # no driver: no GPU
        return []


def predicted_oom(recipe: recipes.Recipe, gpu_memory: int | None) -> str | None:
    """Why the planner expects this row not to fit on these GPUs (today's stack), or None."""
    if gpu_memory is None or not needs_gpus(recipe):
        return None
    from ..planner import GIB, predict_recipe

    p = predict_recipe(recipe, "today", gpu_memory)
    if p.verdict != "oom":
        return None
    return (f"predicted OOM: {p.live / GIB:.1f} GiB live on a {gpu_memory / GIB:.1f} GiB GPU "
            f"(shardkit plan {recipe.name}; --run-predicted-oom runs it anyway)")


def needs_gpus(recipe: recipes.Recipe) -> bool:
    """The table's rows need their GPUs; tiny recipes run anywhere (on CPU ranks without a GPU)."""
    return preset_name(recipe.model) != "tiny"


def campaign_dir(root: Path, probe: int | None, stack: str = "today") -> Path:
    """One folder per campaign and stack (results/full, results/full-period, results/probe20-2023-emulated):
    a row run on another stack never replaces today's result, nor passes for it as "finished earlier"."""
    name = f"probe{probe}" if probe else "full"
    return root / (name if stack == "today" else f"{name}-{stack}")


def row_dir(root: Path, recipe: recipes.Recipe, probe: int | None, stack: str = "today") -> Path:
    return campaign_dir(root, probe, stack) / recipe.name


def row_stack(overrides: list[str], period: bool) -> str:
    """The stack a row's results will name (results.document.stack_label): ``period`` where it runs on the
    period stack (``period``: the installed torch, or the image's flavour), ``2023-emulated`` with an override
    ``--stack 2023``, else ``today``."""
    if period:
        return "period"
    pairs = [" ".join(overrides[i:i + 2]) for i in range(len(overrides))]
    return "2023-emulated" if "--stack 2023" in pairs or "--stack=2023" in overrides else "today"


def period_here() -> bool:
    """Whether this process runs on the period stack, by the rule its results will be labelled with."""
    from ..spec.resolve import installed_stack

    return installed_stack("today") == "period"


def nodes_from_env() -> tuple[int, int, str | None]:
    """torchrun's c10d rendezvous for a row spread over nodes: NNODES, NODE_RANK, RDZV_ENDPOINT (host:port)."""
    nodes = int(os.environ.get("NNODES", "1"))
    endpoint = os.environ.get("RDZV_ENDPOINT")
    if nodes > 1 and not endpoint:
        raise UsageError(f"NNODES={nodes} needs RDZV_ENDPOINT=host:port (the first node's address)")
    return nodes, int(os.environ.get("NODE_RANK", "0")), endpoint


def train_argv(recipe: recipes.Recipe, output_dir: Path, overrides: list[str], probe: int | None) -> list[str]:
    nodes, node_rank, endpoint = nodes_from_env()
    if recipe.gpus % nodes:
        raise UsageError(f"recipe {recipe.name}: {recipe.gpus} GPUs do not split over NNODES={nodes}")
    argv = recipes.seed_argv(recipe, str(output_dir)) + ["--nproc_per_node", str(recipe.gpus // nodes)]
    if nodes > 1:
        argv += ["--nnodes", str(nodes), "--node_rank", str(node_rank), "--rdzv_endpoint", endpoint]
    if probe:
        argv += ["--max_steps", str(probe), "--save_strategy", "no"]
    return argv + overrides


def resolve_row(recipe: recipes.Recipe, folder: Path, overrides: list[str], probe: int | None,
                checks_here: bool = True) -> Row:
    """The row's command line, parsed and resolved once; refused input names the recipe. ``checks_here``
    False (the row runs in a container, which checks its own installation, stack and devices): nothing this
    machine has installed is asked (check_row does that for a row that runs here)."""
    from ..spec.config import inert_flags
    from ..spec.flags import parse_args, typed_fields
    from ..spec.resolve import resolve

    try:
        cfg, launch = parse_args(train_argv(recipe, folder, overrides, probe))
        run = resolve(cfg, launch)
        if run.plan.parallelism != recipe.parallelism:
            said = "offloads" if run.plan.parallelism.offload else "does not offload"
            raise UsageError(f"METHOD {recipe.method} contradicts {cfg.deepspeed or '--fsdp ' + cfg.fsdp!r}, which "
                             f"{said}: the run would be {run.plan.parallelism.name}")
    except UsageError as error:
        raise UsageError(f"recipe {recipe.name}: {error}") from None
    for note in inert_flags(cfg, typed_fields(list(overrides))):
        print(f"shardkit: note: recipe {recipe.name}: {note}", file=sys.stderr, flush=True)
    row = Row(recipe, folder, tuple(overrides), probe, run)
    if checks_here:
        check_row(row)
    return row


def check_row(row: Row) -> None:
    """What this machine's installation lacks for the row (a dry run: only what no machine could run)."""
    from ..engine.preflight import check_engine

    try:
        check_engine(row.run, for_training=not row.run.config.dry_run)
    except UsageError as error:
        raise UsageError(f"recipe {row.recipe.name}: {error}") from None


def _tee(stream, log, echo: bool, title: str = "train") -> None:
    """Copies the row's output to its log (and the console, step lines as a live bar on a terminal) until
    the row ends. It must keep reading whatever happens: a reader that stops leaves the pipe full and the
    ranks blocked on their next print."""
    from ..engine.progress import StepRelay

    relay = StepRelay(title) if echo else None
    try:
        _copy(stream, log, relay)
    finally:
        if relay is not None:
            relay.close()


def _copy(stream, log, relay) -> None:
    for line in iter(stream.readline, ""):
        if log is not None:
            try:
                log.write(line)
                log.flush()
            except OSError as error:  # a full disk: the log is lost from here on, the run is not
                sys.stderr.write(f"shardkit: {log.name}: {error.strerror}; no longer logging this row\n")
                log = None
        if relay is not None and not relay.consumed(line):  # stderr: stdout is kept for the verdicts (--json)
            sys.stderr.write(line)
            sys.stderr.flush()


def run_row(row: Row, timeout_s: float | None, echo: bool = True) -> int:
    """One row in its own process group, launched from its resolved run while this process holds the row
    folder's lock; a row that outlives its limit is stopped (its ranks record the steps done) and recorded
    as a timeout."""
    from ..engine.failures import describe_signal_death, oom_kill_count
    from ..engine.launch import write_config

    with first_node_lock(row.folder, f"shardkit row {row.recipe.name}", row.run.launch.node_rank):
        config = write_config(row.run)
        started = time.time()
        oom_before = oom_kill_count()
        with open(row.folder / "train.log", "w") as log:
            process = subprocess.Popen([sys.executable, "-m", "shardkit.engine.launch", str(config)],
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       start_new_session=True)
            reader = threading.Thread(target=_tee, args=(process.stdout, log, echo, row.recipe.name), daemon=True)
            reader.start()
            try:
                code = process.wait(timeout=timeout_s)
                if code < 0:  # the launcher itself was killed: its ranks recorded only that it is gone
                    failure = describe_signal_death(code, None, (oom_before, oom_kill_count()))
                    failure.message = f"the launcher was {failure.message}"
                    code = record_failure(row, failure, started)
            except (subprocess.TimeoutExpired, KeyboardInterrupt) as stop:
                _kill_group(process)
                if isinstance(stop, KeyboardInterrupt):
                    raise
                failure = Failure(kind="timeout", message=f"timed out after {timeout_s:g} s (row time limit)")
                code = record_failure(row, failure, started)
                print(f"shardkit: timeout: {row.recipe.name}: {failure.message}", file=sys.stderr, flush=True)
            finally:
                reader.join(timeout=10)
    return code


def _kill_group(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


def first_node_lock(folder: Path, what: str, node_rank: int):
    """The folder's lock, held by the first node alone: the other nodes of a multi-node row are part of the
    same run and may share the folder."""
    return folder_lock(folder, what) if node_rank == 0 else contextlib.nullcontext()


def finished(output_dir: Path) -> bool:
    """A row is finished once its results file exists (it is written last, atomically)."""
    return (output_dir / RESULTS_FILE).is_file()


def reproduce(names: list[str], root: Path, probe: int | None, force: bool, timeout_s: float | None,
              overrides: list[str], runner=None, run_predicted_oom: bool = False,
              ) -> tuple[dict[str, Path], dict[str, str]]:
    """Runs each row that can run here, with ``runner`` (default: a local process; ``row_runner`` gives the
    container one), holding the campaign folder's lock; returns {name: output folder} and {name: why not
    run}."""
    runner = runner or Runner(run_row, period_here())
    stack = row_stack(overrides, runner.period)
    with first_node_lock(campaign_dir(root, probe, stack), "shardkit reproduce", nodes_from_env()[1]):
        return _reproduce(names, root, probe, force, timeout_s, overrides, runner, run_predicted_oom, stack)


def _reproduce(names, root, probe, force, timeout_s, overrides, runner, run_predicted_oom, stack):
    from rich.console import Console

    console = Console(stderr=True)
    # Every row is resolved (and so checked) before any row runs.
    rows = [resolve_row(recipe, row_dir(root, recipe, probe, stack), overrides, probe, runner.here)
            for recipe in map(recipes.load_recipe, names)]
    memories = visible_gpu_memory()
    gpus = len(memories)
    # A row must fit the smallest card; with --run-predicted-oom nothing is predicted.
    memory = min(memories) if memories and not run_predicted_oom else None
    folders, not_run = {}, {}
    for index, row in enumerate(rows, start=1):
        recipe, folder = row.recipe, row.folder
        folders[recipe.name] = folder
        header = f"[{index}/{len(rows)}] {recipe.name}"
        if needs_gpus(recipe) and recipe.gpus > gpus:
            not_run[recipe.name] = f"needs {recipe.gpus} GPUs, {gpus} visible"
            console.print(f"{header}: not run ({not_run[recipe.name]})")
            continue
        skip = predicted_oom(recipe, memory)
        if skip:
            not_run[recipe.name] = skip
            console.print(f"{header}: not run ({skip})")
            continue
        if finished(folder) and not force:
            console.print(f"{header}: finished earlier, kept ({folder}; --force reruns)")
            continue
        console.rule(header)
        code = runner(row, timeout_s)
        status = read_json(folder / RESULTS_FILE)["status"] if finished(folder) else f"exit {code}"
        console.print(f"{header}: {status}")
    return folders, not_run


@dataclass(frozen=True)
class Runner:
    """What runs one row (``run(row, timeout_s)`` -> exit code), whether it runs on the period stack, and
    whether it runs here (with this machine's installation) or in a container."""

    run: Callable[[Row, float | None], int]
    period: bool
    here: bool = True

    def __call__(self, row: Row, timeout_s: float | None) -> int:
        return self.run(row, timeout_s)


def row_runner(kind: str, image: str, results_root: Path) -> Runner:
    """The runner of one row, here ("native") or in a container ("docker"); "auto" takes the container when
    the daemon can give it GPUs and has the image. Everything above it is shared."""
    here = Runner(run_row, period_here())
    if kind == "native":
        return here
    from . import containers

    connection = None
    if kind == "auto":
        try:
            connection = containers.client()
        except containers.DockerUnavailable:
            return here
        if not (containers.has_gpu_runtime(connection) and connection.images.list(name=image)):
            return here

    def in_container(row: Row, timeout_s: float | None) -> int:
        return containers.run_recipe(image, row, results_root, timeout_s)

    flavour = containers.image_flavour(connection or containers.client(), image)
    return Runner(in_container, flavour == "period", here=False)
