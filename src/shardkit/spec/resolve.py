"""Resolve once: a run configuration and a world become the resolved run (model shape and parameter count,
batch and step arithmetic, the parallel method with DeepSpeed's "auto" values filled, the fake-world rules),
checked before any process starts; bad input fails here, as one line. Everything downstream (launcher,
ranks, containers, results, diff) reads this object, or the ``config.json`` it is saved as, and never
parses a command line again."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UsageError
from .architecture import default_seq_len
from .config import TrainConfig
from .datasets import check_data_source, read_records
from .deepspeed_config import resolve_deepspeed_config
from .parallelism import Parallelism, deepspeed_offload
from .paths import folder_problem
from .presets import ModelSpec, parameter_counts, resolve_model
from .resume import check_resume, check_same_run, run_identity
from .typed import dump


@dataclass(frozen=True)
class Launch:
    """How the ranks are started when shardkit is the launcher (torchrun's flags)."""

    nproc_per_node: int = 1
    """Processes on this node."""
    nnodes: int = 1
    """Nodes taking part (c10d rendezvous)."""
    node_rank: int = 0
    """This node's rank; global rank 0 (on node 0) writes the results."""
    rdzv_endpoint: str | None = None
    """host:port of the c10d rendezvous; None on one node."""

    @property
    def multi_node(self) -> bool:
        return self.nnodes > 1 or self.rdzv_endpoint is not None


@dataclass
class RunPlan:
    world_size: int
    """Ranks of the job; with ``fake_world`` the ranks this one process stands for."""
    fake_world: bool
    """One process is rank 0 of ``world_size`` ranks on a fake process group (memory only, no checkpoints)."""
    parallelism: Parallelism
    engine: str
    model: ModelSpec
    seq_len: int
    num_examples: int
    micro_batch: int
    """Sequences per rank per micro-step, the one value both engines read."""
    gradient_accumulation_steps: int
    global_batch: int
    steps_per_epoch: int
    full_run_steps: int
    total_steps: int
    warmup_steps: int
    save_every: int | None
    """Optimizer steps between checkpoints; None: no checkpoints (never in a fake world: one rank's shards)."""
    deepspeed_config: dict | None = None
    parameters: dict = field(default_factory=dict)
    stack: str = "today"
    """The FSDP behaviour the native engine runs: today (FSDP2) or 2023 (FSDP1 as HF Trainer 4.28 ran it)."""

    def to_dict(self) -> dict:
        return {**asdict(self), "method": self.parallelism.name}

    @classmethod
    def from_dict(cls, values: dict) -> RunPlan:
        values = {k: v for k, v in values.items() if k != "method"}
        return cls(**{**values, "model": ModelSpec(**values["model"]),
                      "parallelism": Parallelism(**values["parallelism"])})


@dataclass(frozen=True)
class ResolvedRun:
    """What every process of a run reads: the configuration, the plan derived from it, how it is launched."""

    config: TrainConfig
    plan: RunPlan
    launch: Launch

    def to_dict(self) -> dict:
        return {"config": dump(self.config), "plan": self.plan.to_dict(), "launch": asdict(self.launch)}

    @classmethod
    def from_dict(cls, values: dict) -> ResolvedRun:
        return cls(TrainConfig(**values["config"]), RunPlan.from_dict(values["plan"]), Launch(**values["launch"]))


def parallelism_of(cfg: TrainConfig, deepspeed_json: dict | None) -> Parallelism:
    if cfg.fsdp:
        return Parallelism("fsdp", cfg.fsdp_offload)
    if deepspeed_json is not None:
        try:
            return Parallelism("zero3", deepspeed_offload(deepspeed_json))
        except ValueError as error:
            raise UsageError(f"{cfg.deepspeed}: {error}") from None
    raise UsageError("no parallel method: pass --fsdp 'full_shard auto_wrap' (optionally 'offload') or --deepspeed FILE")


def _world(cfg: TrainConfig, launch: Launch, torchrun_world: int | None) -> int:
    if launch.nproc_per_node < 1:
        raise UsageError(f"--nproc_per_node {launch.nproc_per_node}: must be at least 1")
    if launch.nnodes < 1:
        raise UsageError(f"--nnodes {launch.nnodes}: must be at least 1")
    if cfg.fake_world:
        if launch.nproc_per_node not in (1, cfg.fake_world) or launch.nnodes > 1:
            raise UsageError(f"--fake_world {cfg.fake_world} runs one process standing for {cfg.fake_world} ranks; "
                             f"--nproc_per_node {launch.nproc_per_node} / --nnodes {launch.nnodes} contradict it")
        return cfg.fake_world
    return torchrun_world or launch.nproc_per_node * launch.nnodes


def resolve(cfg: TrainConfig, launch: Launch = Launch(), torchrun_world: int | None = None) -> ResolvedRun:
    """All cheap checks and derived numbers. Raises UsageError naming the flag or file at fault.
    ``torchrun_world``: the world size when an outside torchrun started this process as one rank."""
    world_size = _world(cfg, launch, torchrun_world)
    model = resolve_model(cfg)
    check_data_source(cfg)
    problem = folder_problem(cfg.output_dir)
    if problem:
        raise UsageError(f"--output_dir {cfg.output_dir!r}: {problem}")
    check_resume(cfg.resume_from_checkpoint, cfg.output_dir, cfg.engine)
    deepspeed_json = None
    if cfg.deepspeed:
        from .deepspeed_config import load_deepspeed_json

        deepspeed_json = load_deepspeed_json(cfg.deepspeed)
    parallelism = parallelism_of(cfg, deepspeed_json)
    seq_len = cfg.model_max_length or default_seq_len(model.architecture)
    examples = len(read_records(Path(cfg.data_path))) if cfg.data_path else cfg.num_examples
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
    saves = cfg.save_strategy == "steps" and not cfg.fake_world
    plan = RunPlan(world_size=world_size, fake_world=bool(cfg.fake_world), parallelism=parallelism,
                   engine=cfg.engine, model=model, seq_len=seq_len, num_examples=examples,
                   micro_batch=cfg.per_device_train_batch_size,
                   gradient_accumulation_steps=cfg.gradient_accumulation_steps, global_batch=global_batch,
                   steps_per_epoch=steps_per_epoch, full_run_steps=full_run_steps, total_steps=total_steps,
                   warmup_steps=math.ceil(cfg.warmup_ratio * total_steps),
                   save_every=cfg.save_steps if saves else None, parameters=parameter_counts(model.hf_config),
                   stack=cfg.stack)
    if deepspeed_json is not None:
        plan.deepspeed_config = resolve_deepspeed_config(cfg, plan, deepspeed_json)
    if cfg.resume_from_checkpoint and cfg.engine == "native":
        check_same_run(cfg.resume_from_checkpoint, cfg.output_dir, run_identity(plan, cfg.stack))
    return ResolvedRun(cfg, plan, launch)


def installed_stack(plan_stack: str) -> str:
    """The stack label a run with this plan would have here (period, 2023-emulated or today)."""
    from importlib import metadata

    from ..results.document import stack_label

    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = None
    return stack_label(plan_stack, {"torch": torch_version})


def dry_run_text(run: ResolvedRun) -> str:
    """The dry run's printout."""
    plan, cfg = run.plan, run.config
    shape = plan.model.hf_config
    params = plan.parameters
    lines = [
        f"model        {plan.model.name}: {shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}, "
        f"intermediate {shape['intermediate_size']}, {shape['num_attention_heads']} heads, vocab {shape['vocab_size']}",
        f"parameters   {params['total']:,} ({params['total'] / 1e9:.2f}e9), matmul {params['matmul']:,}",
        f"weights      {plan.model.weights_dir or 'random init (memory and time do not depend on values)'}",
        f"method       {plan.parallelism.name} (engine {plan.engine}, {installed_stack(plan.stack)} stack), attention {cfg.attn_implementation}, "
        f"checkpointing {'on' if cfg.gradient_checkpointing else 'off'}, bf16 {cfg.bf16}",
        f"world size   {plan.world_size}" + (" (fake: rank 0 alone, collectives do nothing)" if plan.fake_world else ""),
        f"batch        micro {plan.micro_batch} x accumulation {plan.gradient_accumulation_steps} x "
        f"{plan.world_size} ranks = global {plan.global_batch} sequences of {plan.seq_len} tokens",
        f"data         {plan.num_examples} examples, {plan.steps_per_epoch} optimizer steps per epoch",
        f"steps        {plan.total_steps} optimizer steps this run ({plan.full_run_steps} for "
        f"{cfg.num_train_epochs:g} epochs), {plan.warmup_steps} warm-up",
        f"output       {cfg.output_dir}",
    ]
    return "\n".join(lines)
