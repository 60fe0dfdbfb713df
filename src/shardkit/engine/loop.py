"""One readable training loop for every strategy (FSDP2, ZeRO-3): micro-steps, optimizer step, timing,
checkpoints. Warm-up steps are timed like the rest and left out of the steady state in ``metrics``."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ..results.record import Recorder
from ..spec.resume import run_identity
from . import checkpoints
from .data import RankSampler
from .measure import StepClock
from .progress import Progress
from .strategy import Strategy

if TYPE_CHECKING:
    from ..spec.resolve import ResolvedRun


def _mean_over_ranks(value: torch.Tensor) -> float:
    value = value.detach().float().reshape(1).to(_collective_device())
    dist.all_reduce(value)
    return value.item() / dist.get_world_size()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def run_loop(strategy: Strategy, dataset, run: ResolvedRun, rank: int, device, recorder: Recorder, memory) -> None:
    """Runs optimizer steps until the plan's total; fills ``recorder`` as it goes."""
    cfg, plan = run.config, run.plan
    sampler = RankSampler(len(dataset), rank, plan.world_size, cfg.seed)
    step = 0
    if cfg.resume_from_checkpoint:
        step = checkpoints.restore(strategy, checkpoints.find(cfg.resume_from_checkpoint, cfg.output_dir))["step"]
    tokens_per_step = plan.global_batch * plan.seq_len
    clock = StepClock(recorder.step_times_s)
    progress = Progress(plan.total_steps, step, cfg.logging_steps, enabled=rank == 0)
    micro_per_step = plan.gradient_accumulation_steps
    recorder.begin(step)
    try:
        while step < plan.total_steps:
            sampler.epoch = step // plan.steps_per_epoch
            sampler.skip = (step % plan.steps_per_epoch) * micro_per_step * plan.micro_batch
            loader = torch.utils.data.DataLoader(dataset, batch_size=plan.micro_batch, sampler=sampler, drop_last=True)
            batches = iter(loader)
            for _ in range(plan.steps_per_epoch - step % plan.steps_per_epoch):
                recorder.current_step = step + 1
                clock.start()
                losses = []
                for micro in range(micro_per_step):
                    batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
                    losses.append(strategy.micro_step(batch, last=micro == micro_per_step - 1))
                strategy.optimizer_step()
                elapsed = clock.stop()
                step += 1
                recorder.logged(_mean_over_ranks(torch.stack(losses).mean()), strategy.current_lr())
                progress.update(step, recorder.loss[-1], tokens_per_step / elapsed, memory.current())
                if plan.save_every and step % plan.save_every == 0:
                    started = time.perf_counter()
                    # What made the checkpoint, so that a resume by another run is refused before it starts.
                    position = {"epoch": step // plan.steps_per_epoch, "run": run_identity(plan, cfg.stack)}
                    checkpoints.save(strategy, cfg.output_dir, step, position, cfg.save_total_limit)
                    recorder.checkpoint_s.append(time.perf_counter() - started)
                if step >= plan.total_steps:
                    break
    finally:
        progress.close()
    recorder.end()
