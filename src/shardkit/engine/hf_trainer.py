"""``--engine hf``: the same run through HF Trainer, the stack the table was measured with.

Must stay importable on the 2023 stack (torch 2.0.1, transformers 4.28, accelerate 0.18): no FSDP2 or
other newer-API import here, and TrainingArguments' field names are looked up, not assumed, since
transformers renamed several of the seed's flags."""

from __future__ import annotations

import dataclasses
import importlib.util
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import UsageError
from ..results.record import Recorder
from ..spec.architecture import decoder_layer_of
from .measure import StepClock
from .progress import Progress

if TYPE_CHECKING:
    from ..spec.resolve import ResolvedRun


def _deepspeed_has_cpu_accelerator() -> bool:
    """Looked up in DeepSpeed's files, not imported: importing DeepSpeed takes seconds."""
    spec = importlib.util.find_spec("deepspeed")
    return spec is not None and spec.origin is not None and (
        Path(spec.origin).parent / "accelerator" / "cpu_accelerator.py").exists()


def check_supported(plan) -> None:
    """What HF Trainer cannot do without a GPU, as one line. It does not shard on CPU: with --fsdp,
    transformers 5 with accelerate 1.15 wrap the model in DDP (distributed type MULTI_CPU) without a word,
    and transformers 4.28 fails inside torch 2.0's FSDP, which wants CUDA (both seen); a DDP number must never
    pass for an FSDP one. DeepSpeed 0.9 has no CPU accelerator (0.9.2 ignores DS_ACCELERATOR=cpu, seen)."""
    if torch.cuda.is_available():
        return
    from ..spec.config import default_engine

    deepspeed_on_cpu = _deepspeed_has_cpu_accelerator()
    alternatives = ["a GPU"]
    if default_engine() == "native":
        alternatives.append("--engine native (FSDP2 shards on CPU)")
    if deepspeed_on_cpu:
        alternatives.append("--deepspeed (ZeRO-3 runs on CPU)")
    if plan.parallelism.kind == "fsdp":
        raise UsageError("--engine hf with --fsdp needs GPUs: HF Trainer does not shard on CPU (it falls back to "
                         f"DDP, or fails inside torch's FSDP); use {' or '.join(alternatives)}")
    if not deepspeed_on_cpu:
        import deepspeed

        raise UsageError(f"--deepspeed needs GPUs with DeepSpeed {deepspeed.__version__}: it has no CPU accelerator; "
                         f"use {' or '.join(alternatives)}")


def training_arguments(run: ResolvedRun, device) -> dict:
    """The resolved run in the installed transformers' TrainingArguments vocabulary."""
    from transformers import TrainingArguments

    cfg, plan = run.config, run.plan
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    args = dict(output_dir=cfg.output_dir, num_train_epochs=cfg.num_train_epochs, max_steps=cfg.max_steps,
                per_device_train_batch_size=plan.micro_batch,
                gradient_accumulation_steps=plan.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
                weight_decay=cfg.weight_decay, adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2,
                adam_epsilon=cfg.adam_epsilon, max_grad_norm=cfg.max_grad_norm, lr_scheduler_type=cfg.lr_scheduler_type,
                seed=cfg.seed, bf16=cfg.bf16, gradient_checkpointing=cfg.gradient_checkpointing,
                save_strategy=cfg.save_strategy, save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit,
                logging_steps=1, report_to=[], disable_tqdm=True, remove_unused_columns=False)
    args["eval_strategy" if "eval_strategy" in fields else "evaluation_strategy"] = cfg.eval_strategy
    if "warmup_ratio" in fields:
        args["warmup_ratio"] = cfg.warmup_ratio
    else:  # transformers 5: a float below 1 in warmup_steps is a ratio
        args["warmup_steps"] = cfg.warmup_ratio
    if device.type == "cuda":
        args["tf32"] = cfg.tf32
    else:
        args["use_cpu" if "use_cpu" in fields else "no_cuda"] = True
    if cfg.gradient_checkpointing and "gradient_checkpointing_kwargs" in fields:
        args["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    if plan.parallelism.kind == "fsdp":
        args["fsdp"] = cfg.fsdp
        layer = cfg.fsdp_transformer_layer_cls_to_wrap or decoder_layer_of(plan.model.hf_config)
        if "fsdp_transformer_layer_cls_to_wrap" in fields:
            args["fsdp_transformer_layer_cls_to_wrap"] = layer
        else:
            args["fsdp_config"] = {"transformer_layer_cls_to_wrap": [layer]}
    if plan.deepspeed_config is not None:
        args["deepspeed"] = plan.deepspeed_config
    return args


def _measuring_callback(recorder: Recorder, memory, plan, rank: int, logging_steps: int):
    from transformers import TrainerCallback

    tokens_per_step = plan.global_batch * plan.seq_len

    class Measure(TrainerCallback):
        """Times each optimizer step (on_step_begin .. on_step_end, device synchronized) and keeps the
        loss HF logs every step (already averaged over ranks by the Trainer)."""

        def __init__(self):
            self.clock = StepClock(recorder.step_times_s)
            self.progress = None
            self.step_ended_at = None

        def on_train_begin(self, args, state, control, **kwargs):
            recorder.begin(state.global_step)
            self.progress = Progress(state.max_steps, state.global_step, logging_steps, enabled=rank == 0)

        def on_step_begin(self, args, state, control, **kwargs):
            recorder.current_step = state.global_step + 1
            self.clock.start()

        def on_step_end(self, args, state, control, **kwargs):
            self.clock.stop()
            self.step_ended_at = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                recorder.logged(float(logs["loss"]), float(logs.get("learning_rate", 0.0)))
                elapsed = self.clock.times[-1] if self.clock.times else float("nan")
                self.progress.update(state.global_step, recorder.loss[-1], tokens_per_step / elapsed,
                                     memory.current())

        def on_save(self, args, state, control, **kwargs):
            if self.step_ended_at is not None:
                recorder.checkpoint_s.append(time.perf_counter() - self.step_ended_at)

        def on_train_end(self, args, state, control, **kwargs):
            recorder.end()
            self.progress.close()

    return Measure()


def run_trainer(run: ResolvedRun, rank: int, device, dataset, recorder: Recorder, memory) -> None:
    """Runs HF Trainer over the run's data set, filling ``recorder`` like the native loop. What each rank
    holds is not read back from HF's wrappers."""
    from transformers import PrinterCallback, Trainer, TrainingArguments

    from .models import build_model

    cfg, plan = run.config, run.plan
    # Arguments first: with a ZeRO-3 config alive, transformers builds the model under deepspeed.zero.Init.
    args = TrainingArguments(**training_arguments(run, device))
    if plan.parallelism.kind == "zero3":
        from .deepspeed_ops import init_distributed

        init_distributed()  # zero.Init partitions over deepspeed.comm, which must adopt our group
    model = build_model(plan.model, cfg.attn_implementation, cfg.seed)
    callback = _measuring_callback(recorder, memory, plan, rank, cfg.logging_steps)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback])
    trainer.remove_callback(PrinterCallback)  # our progress line replaces its printed log dicts
    resume = cfg.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=True if resume == "latest" else resume)
