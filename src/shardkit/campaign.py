"""Running recipes: one row (``shardkit run``) or many (``shardkit reproduce``), each row in its own process
with a time limit, its results written atomically as it finishes, finished rows skipped on resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import recipes, results
from .errors import UsageError
from .models import preset_name


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
    from .planner import GIB, predict_recipe

    p = predict_recipe(recipe, "today", gpu_memory)
    if p.verdict != "oom":
        return None
    return (f"predicted OOM: {p.live / GIB:.1f} GiB live on a {gpu_memory / GIB:.1f} GiB GPU "
            f"(shardkit plan {recipe.name}; --run-predicted-oom runs it anyway)")


def needs_gpus(recipe: recipes.Recipe) -> bool:
    """The table's rows need their GPUs; tiny recipes run anywhere (on CPU ranks without a GPU)."""
    return preset_name(recipe.model) != "tiny"


def row_dir(root: Path, recipe: recipes.Recipe, probe: int | None) -> Path:
    return root / (f"probe{probe}" if probe else "full") / recipe.name


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


def _tee(stream, log, echo: bool) -> None:
    for line in iter(stream.readline, ""):
        log.write(line)
        log.flush()
        if echo:  # stderr: stdout is kept for the verdicts (--json)
            sys.stderr.write(line)
            sys.stderr.flush()


def run_row(recipe: recipes.Recipe, output_dir: Path, overrides: list[str], probe: int | None,
            timeout_s: float | None, echo: bool = True) -> int:
    """One row in its own process group; a row that outlives its limit is killed and recorded as an error."""
    output_dir.mkdir(parents=True, exist_ok=True)
    argv = train_argv(recipe, output_dir, overrides, probe)
    started = time.time()
    with open(output_dir / "train.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "shardkit.train", *argv], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        reader = threading.Thread(target=_tee, args=(process.stdout, log, echo), daemon=True)
        reader.start()
        try:
            code = process.wait(timeout=timeout_s)
        except (subprocess.TimeoutExpired, KeyboardInterrupt) as stop:
            _kill_group(process)
            if isinstance(stop, KeyboardInterrupt):
                raise
            code = record_failure(argv, {"kind": "error", "rank": None, "step": None, "device": None,
                                         "bytes_requested": None,
                                         "message": f"timed out after {timeout_s:g} s (row time limit)"}, started)
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


def _resolved(argv: list[str]):
    from .args import parse_args
    from .models import build_on_meta, parameter_counts
    from .plan import resolve

    cfg, options = parse_args(argv)
    plan = resolve(cfg, (options.nproc_per_node or 1) * options.nnodes)
    plan.parameters = parameter_counts(build_on_meta(plan.model, cfg.attn_implementation))
    return cfg, plan


def check(recipe: recipes.Recipe, output_dir: Path, overrides: list[str], probe: int | None) -> None:
    """Raises UsageError (naming the recipe) if the row's command line would be refused."""
    try:
        _resolved(train_argv(recipe, output_dir, overrides, probe))
    except UsageError as error:
        raise UsageError(f"recipe {recipe.name}: {error}") from None


def record_failure(argv: list[str], failure: dict, started: float | None = None) -> int:
    """Results for a row whose ranks wrote none (timed out, killed), in the row's output folder."""
    from .launch import write_failure

    cfg, plan = _resolved(argv)
    return write_failure(cfg, plan, started or time.time(), failure)


def finished(output_dir: Path) -> bool:
    """A row is finished once its results file exists (it is written last, atomically)."""
    return (output_dir / results.RESULTS_FILE).is_file()


def reproduce(names: list[str], root: Path, probe: int | None, force: bool, timeout_s: float | None,
              overrides: list[str], runner=None, run_predicted_oom: bool = False,
              ) -> tuple[dict[str, Path], dict[str, str]]:
    """Runs each row that can run here, with ``runner`` (default: a local process; containers.run_recipe
    bound to an image is the other); returns {name: output folder} and {name: why not run}."""
    runner = runner or run_row
    from rich.console import Console

    console = Console(stderr=True)
    chosen = [recipes.load(name) for name in names]
    for recipe in chosen:  # every row's flags are checked before any row runs
        check(recipe, row_dir(root, recipe, probe), overrides, probe)
    memories = visible_gpu_memory()
    gpus = len(memories)
    # A row must fit the smallest card; with --run-predicted-oom nothing is predicted.
    memory = min(memories) if memories and not run_predicted_oom else None
    folders, not_run = {}, {}
    for index, recipe in enumerate(chosen, start=1):
        folder = row_dir(root, recipe, probe)
        folders[recipe.name] = folder
        header = f"[{index}/{len(chosen)}] {recipe.name}"
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
        code = runner(recipe, folder, overrides, probe, timeout_s)
        status = results.read_json(folder / results.RESULTS_FILE)["status"] if finished(folder) else f"exit {code}"
        console.print(f"{header}: {status}")
    return folders, not_run
