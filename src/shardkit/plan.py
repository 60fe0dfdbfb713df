"""The resolved run: everything derived from the configuration and the world size, checked before any
process group starts (bad input fails here, as one line)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .data import check_data_source
from .errors import UsageError
from .models import ModelSpec, resolve_model


@dataclass
class RunPlan:
    world_size: int
    method: str
    engine: str
    model: ModelSpec
    seq_len: int
    num_examples: int
    micro_batch: int
    gradient_accumulation_steps: int
    global_batch: int
    steps_per_epoch: int
    full_run_steps: int
    total_steps: int
    warmup_steps: int
    deepspeed_config: dict | None = None
    parameters: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _examples(cfg, model: ModelSpec) -> int:
    if not cfg.data_path:
        return cfg.num_examples
    from .data import read_records

    return len(read_records(Path(cfg.data_path)))


def resolve(cfg, world_size: int) -> RunPlan:
    """All cheap checks and derived numbers. Raises UsageError naming the flag or file at fault."""
    if world_size < 1:
        raise UsageError(f"world size {world_size}: must be at least 1")
    model = resolve_model(cfg)
    check_data_source(cfg)
    if cfg.method == "none":
        raise UsageError("no parallel method: pass --fsdp 'full_shard auto_wrap' (optionally 'offload') or --deepspeed FILE")
    seq_len = cfg.model_max_length or model.hf_config["max_position_embeddings"]
    examples = _examples(cfg, model)
    if world_size > examples:
        raise UsageError(f"{world_size} ranks but only {examples} examples: every rank needs data")
    micro_batches_per_epoch = examples // world_size // cfg.per_device_train_batch_size
    steps_per_epoch = micro_batches_per_epoch // cfg.gradient_accumulation_steps
    if steps_per_epoch < 1:
        raise UsageError(
            f"--per_device_train_batch_size {cfg.per_device_train_batch_size} x --gradient_accumulation_steps "
            f"{cfg.gradient_accumulation_steps} x {world_size} ranks needs more than the {examples} examples")
    global_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world_size
    # HF Trainer's arithmetic: ceil(epochs x updates per epoch), warm-up ceil(ratio x steps).
    full_run_steps = math.ceil(cfg.num_train_epochs * steps_per_epoch)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else full_run_steps
    plan = RunPlan(world_size=world_size, method=cfg.method, engine=cfg.engine, model=model, seq_len=seq_len,
                   num_examples=examples, micro_batch=cfg.per_device_train_batch_size,
                   gradient_accumulation_steps=cfg.gradient_accumulation_steps, global_batch=global_batch,
                   steps_per_epoch=steps_per_epoch, full_run_steps=full_run_steps, total_steps=total_steps,
                   warmup_steps=math.ceil(cfg.warmup_ratio * total_steps))
    if cfg.deepspeed:
        from .zero3 import resolve_deepspeed_config

        plan.deepspeed_config = resolve_deepspeed_config(cfg, plan)
    if cfg.engine == "hf":
        from .hf_engine import check_supported

        check_supported(cfg)
    return plan


def describe(plan: RunPlan, cfg) -> str:
    """The dry run's printout."""
    shape = plan.model.hf_config
    params = plan.parameters
    lines = [
        f"model        {plan.model.name}: {shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}, "
        f"intermediate {shape['intermediate_size']}, {shape['num_attention_heads']} heads, vocab {shape['vocab_size']}",
        f"parameters   {params.get('total', 0):,} ({params.get('total', 0) / 1e9:.2f}e9), "
        f"matmul {params.get('matmul', 0):,}",
        f"weights      {plan.model.weights_dir or 'random init (memory and time do not depend on values)'}",
        f"method       {plan.method} (engine {plan.engine}), attention {cfg.attn_implementation}, "
        f"checkpointing {'on' if cfg.gradient_checkpointing else 'off'}, bf16 {cfg.bf16}",
        f"world size   {plan.world_size}" + (" (fake: rank 0 alone, collectives do nothing)" if cfg.fake_world else ""),
        f"batch        micro {plan.micro_batch} x accumulation {plan.gradient_accumulation_steps} x "
        f"{plan.world_size} ranks = global {plan.global_batch} sequences of {plan.seq_len} tokens",
        f"data         {plan.num_examples} examples, {plan.steps_per_epoch} optimizer steps per epoch",
        f"steps        {plan.total_steps} optimizer steps this run ({plan.full_run_steps} for "
        f"{cfg.num_train_epochs:g} epochs), {plan.warmup_steps} warm-up",
        f"output       {cfg.output_dir}",
    ]
    return "\n".join(lines)
