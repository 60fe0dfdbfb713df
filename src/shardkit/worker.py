"""One rank of a run: set up, train, measure, and write the results, whatever happens.

On failure the failing rank writes the results (status oom or error) itself and leaves at once with the
matching exit code; torchrun then stops the other ranks, so nobody waits on a collective that will never
complete."""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from . import results
from .errors import EXIT_ERROR, EXIT_OOM
from .failures import classify
from .measure import MemoryMonitor, matmul_bf16_flops


def launch_time() -> float:
    """When the run was launched: set by shardkit's launcher, else the start of torchrun (our parent)."""
    if os.environ.get("SHARDKIT_LAUNCH_TIME"):
        return float(os.environ["SHARDKIT_LAUNCH_TIME"])
    try:
        import psutil

        return psutil.Process(os.getppid()).create_time()
    except Exception:  # no parent information: fall back to this process's own start
        return time.time() - time.process_time()


def _device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _train_native(cfg, plan, device, dataset, record, memory) -> dict:
    """shardkit's own loop; returns what each rank holds of each parameter."""
    if cfg.deepspeed:
        from .zero3 import ZeroStrategy as Strategy
    else:
        from .fsdp import FsdpStrategy as Strategy  # FSDP2: newer-API module, imported only here
    strategy = Strategy(cfg, plan, device)
    from .loop import train

    train(strategy, dataset, cfg, plan, device, record, memory)
    return strategy.held_by_rank()


def _summarize_holdings(held: dict | None) -> dict | None:
    if held is None:
        return None
    params = held["parameters"].values()
    return {"param_elements_local": sum(p["local"] for p in params),
            "param_elements_global": sum(p["global"] for p in params),
            "optimizer_state_bytes": held["optimizer_state_bytes"], "gradient_bytes": held["gradient_bytes"],
            "master_bytes": held.get("master_bytes")}


def run(cfg, plan) -> int:
    started = launch_time()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    output = Path(cfg.output_dir)
    record: dict = {}
    environment = data_info = memory = None
    try:
        device = _device(int(os.environ.get("LOCAL_RANK", 0)))
        if cfg.deepspeed and device.type == "cpu":
            from .zero3 import adapt_to_cpu

            record["cpu_adaptations"] = adapt_to_cpu(plan.deepspeed_config)
        if cfg.fake_world:
            # torchtitan's dry-run store: a process group whose collectives return at once.
            from torch.testing._internal.distributed.fake_pg import FakeStore

            dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=cfg.fake_world)
        else:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if rank == 0:  # a previous run's outcome in this folder must not pass for this one's
            for stale in [output / results.RESULTS_FILE, *output.glob("error-rank*.log")]:
                stale.unlink(missing_ok=True)
            results.write_json_atomic(output / results.CONFIG_FILE, {"config": cfg.model_dump(), "plan": plan.to_dict(),
                                                                   "adaptations": record.get("cpu_adaptations", [])})
        dist.barrier()
        if cfg.tf32 and device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        from .environment import describe

        environment = describe(world)
        environment["matmul_bf16_flops"] = matmul_bf16_flops()
        memory = MemoryMonitor(cfg.nvml_sample_interval_s)  # after the matmul probe: its buffers don't count
        from .data import build_dataset

        dataset = build_dataset(cfg, plan.model, plan.seq_len)
        data_info = dataset.info
        if cfg.engine == "hf":
            from .hf_engine import train as train_hf

            held = train_hf(cfg, plan, device, dataset, record, memory)
        else:
            held = _train_native(cfg, plan, device, dataset, record, memory)
        mine = {"rank": rank, "memory": memory.close(), "holds": _summarize_holdings(held), "held": held}
        if cfg.fake_world:  # one rank: the fake group would hand back N copies of it
            gathered = [mine]
        else:
            gathered = [None] * world
            dist.all_gather_object(gathered, mine)
        if rank == 0 and held is not None:
            # Per parameter and rank: what each rank holds of it (the planner's ground truth).
            results.write_json_atomic(output / "sharding.json",
                                      {"per_rank": [{"rank": g["rank"], **g["held"]} for g in gathered]})
        if rank == 0:
            for entry in gathered:
                entry.pop("held")
            document = results.build(status="ok", cfg=cfg, plan=plan, record=record, per_rank=gathered,
                                     environment=environment, data_info=data_info, failure=None,
                                     launch_time=started, now=time.time())
            results.write_json_atomic(output / results.RESULTS_FILE, document)
        dist.barrier()
        dist.destroy_process_group()  # DeepSpeed's CPU comm aborts the interpreter at exit without it
        # Leave without the interpreter's teardown, which sometimes aborted a rank whose work was done and
        # written ("terminate called without an active exception": 3 of 41 two-launcher CPU runs, 0 of 40
        # since); most likely the gloo group, still referenced by the model's device mesh, destroyed late.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    except BaseException as error:  # noqa: BLE001 - every failure becomes a result, then a prompt exit
        failure = classify(error, rank, record.get("current_step"))
        status = "oom" if failure["kind"] == "oom" else "error"
        log = output / f"error-rank{rank}.log"
        output.mkdir(parents=True, exist_ok=True)
        log.write_text("".join(traceback.format_exception(error)))
        failure["traceback_file"] = str(log)
        # This rank's peaks up to the failure: a CUDA OOM's reserved memory is the interesting figure.
        mine = {"rank": rank, "memory": memory.close() if memory is not None else None, "holds": None}
        document = results.build(status=status, cfg=cfg, plan=plan, record=record, per_rank=[mine],
                                 environment=environment, data_info=data_info, failure=failure,
                                 launch_time=started, now=time.time())
        results.write_json_atomic(output / results.RESULTS_FILE, document)
        where = f"rank {rank}, step {failure['step']}" if failure["step"] else f"rank {rank}, before training"
        asked = f", {failure['bytes_requested']:,} bytes requested" if failure["bytes_requested"] else ""
        print(f"shardkit: {status}: {where}{asked}: {failure['message']} (traceback: {log})", file=sys.stderr,
              flush=True)
        sys.stdout.flush()
        os._exit(EXIT_OOM if status == "oom" else EXIT_ERROR)
