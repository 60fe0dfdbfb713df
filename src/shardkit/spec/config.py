"""The one typed configuration of a training run.

Field names follow HF ``TrainingArguments`` so that the seed's command lines map onto them flag for
flag; every field's docstring is its ``--help`` text. Unknown keys are rejected (``extra="forbid"``),
and the resolved configuration is written beside the results of every run.
"""

from __future__ import annotations

from importlib import metadata
from typing import Literal

from pydantic import BaseModel, Field

from .typed import STRICT, after_validator, field_docstrings

Engine = Literal["native", "hf"]
AttnImplementation = Literal["eager", "sdpa", "flash_attention_2"]
Stack = Literal["today", "2023"]

# transformers renamed these after the seed was written (--evaluation_strategy fails verbatim on
# transformers 5's HfArgumentParser); both spellings are accepted.
FLAG_ALIASES = {
    "evaluation_strategy": "eval_strategy",
}


# The native engine's FSDP2 (torch.distributed.fsdp.fully_shard and its policies) is public from torch 2.6.
NATIVE_ENGINE_MIN_TORCH = (2, 6)


def installed_torch_release() -> tuple[int, ...] | None:
    """torch's version as numbers, read from its metadata without importing it (the parser stays fast)."""
    from packaging.version import Version

    try:
        return Version(metadata.version("torch")).release
    except metadata.PackageNotFoundError:
        return None


def default_engine() -> Engine:
    release = installed_torch_release()
    return "hf" if release is not None and release < NATIVE_ENGINE_MIN_TORCH else "native"


class TrainConfig(BaseModel, **STRICT):
    """Everything one run needs; one instance per run, saved as ``config.json`` beside its results. Unknown
    keys are refused, and so are inf and nan: an infinite epoch count or learning rate is never meant."""

    # --- what to train -------------------------------------------------------------------------
    model_name_or_path: str = "tiny"
    """Model preset (llama-7b, llama-13b, llama-30b, llama-65b, tiny, or the seed's hub names such as
    decapoda-research/llama-30b-hf), or a local folder with a Hugging Face config.json (and weights)."""

    num_hidden_layers: int | None = Field(default=None, ge=1)
    """Override the preset's number of decoder layers (e.g. 8 for a 7B-layer-shaped probe on one GPU)."""

    hidden_size: int | None = Field(default=None, ge=1)
    """Override the preset's hidden size."""

    intermediate_size: int | None = Field(default=None, ge=1)
    """Override the preset's MLP intermediate size."""

    num_attention_heads: int | None = Field(default=None, ge=1)
    """Override the preset's number of attention heads."""

    attn_implementation: AttnImplementation = "eager"
    """Attention kernel: eager (what the table's 2023 stack ran), sdpa, or flash_attention_2 (if installed).
    It changes activation memory a lot, so it is part of every result."""

    # --- data ----------------------------------------------------------------------------------
    data_path: str | None = None
    """Instruction data (JSON list or JSONL with "prompt" and "response"); unset: synthetic data."""

    tokenizer_path: str | None = None
    """Local tokenizer folder for --data_path (defaults to the model folder). Nothing is downloaded."""

    num_examples: int = Field(default=6000, ge=1)
    """Number of synthetic examples (the seed's 6000)."""

    model_max_length: int | None = Field(default=None, ge=2)
    """Tokens per example; unset: the table's 2048, or the model's context where that is shorter."""

    # --- optimisation (HF TrainingArguments names) ---------------------------------------------
    num_train_epochs: float = Field(default=3.0, gt=0)
    """Epochs over the data set."""

    max_steps: int = -1
    """If > 0: stop after this many optimizer steps (probe mode) and project the full run's wall time."""

    per_device_train_batch_size: int = Field(default=8, ge=1)
    """Micro-batch per rank (the table's "Batch size")."""

    gradient_accumulation_steps: int = Field(default=1, ge=1)
    """Micro-batches per optimizer step."""

    learning_rate: float = Field(default=5e-5, ge=0)
    """Peak learning rate of AdamW."""

    weight_decay: float = Field(default=0.0, ge=0)
    """AdamW decoupled weight decay."""

    adam_beta1: float = Field(default=0.9, ge=0, lt=1)
    """AdamW beta1."""

    adam_beta2: float = Field(default=0.999, ge=0, lt=1)
    """AdamW beta2."""

    adam_epsilon: float = Field(default=1e-8, gt=0)
    """AdamW epsilon."""

    max_grad_norm: float = Field(default=1.0, ge=0)
    """Gradient clipping norm (0 disables)."""

    warmup_ratio: float = Field(default=0.0, ge=0, le=1)
    """Fraction of optimizer steps of linear warm-up; the learning rate then decays linearly to 0."""

    lr_scheduler_type: Literal["linear"] = "linear"
    """Learning-rate schedule (HF's default, the one the seed ran)."""

    seed: int = 42
    """Seed of weights, data and shuffling."""

    bf16: bool = False
    """bf16 mixed precision (parameters kept in fp32, compute and all-gathers in bf16)."""

    tf32: bool | None = None
    """Allow TF32 matmuls on Ampere and later GPUs."""

    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward instead of keeping them."""

    # --- sharding ------------------------------------------------------------------------------
    fsdp: str = ""
    """HF-style FSDP options: "full_shard auto_wrap" and optionally "offload" (parameters, gradients and
    optimizer states on the CPU)."""

    fsdp_transformer_layer_cls_to_wrap: str | None = None
    """The FSDP unit (HF's flag): the model's decoder layer class, e.g. LlamaDecoderLayer; unset: that class,
    from transformers' _no_split_modules. Another class is refused: the kit shards one unit per decoder layer."""

    deepspeed: str | None = None
    """DeepSpeed JSON config file; "auto" values are filled from these flags as HF Trainer does."""

    fake_world: int | None = Field(default=None, ge=2)
    """Run rank 0 of an N-rank FSDP job alone, in this process, on a fake process group: collectives do
    nothing, shards and allocations have their real 1/N shapes (torchtitan's dry run does the same). It
    measures one rank's memory on one device; its time, loss and communication buffers are not the real
    job's, and it writes no checkpoints (they would hold one rank's shards)."""

    engine: Engine = Field(default_factory=default_engine)
    """native: shardkit's own loop (FSDP2 fully_shard or deepspeed.initialize), the default where torch has
    FSDP2; hf: HF Trainer, the stack the table was measured with, and the default on older torch (the period
    image's 2.0.1), which only HF Trainer drives."""

    stack: Stack = "today"
    """Which software behaviour the native engine's FSDP runs: today (FSDP2, fully_shard) or 2023 (the table's:
    FSDP1 configured as HF Trainer 4.28 configured it on torch 2.0, on today's torch; docs/planner.md)."""

    # --- outputs and checkpoints ---------------------------------------------------------------
    output_dir: str = "runs/default"
    """Where results.json, config.json and checkpoints go."""

    run_name: str | None = None
    """The recipe this run reproduces (its reference row for shardkit diff)."""

    eval_strategy: Literal["no"] = "no"
    """Evaluation is not part of the table's measurements; only "no" is accepted."""

    save_strategy: Literal["no", "steps"] = "steps"
    """Checkpoint every --save_steps optimizer steps, or never."""

    save_steps: int = Field(default=500, ge=1)
    """Optimizer steps between checkpoints."""

    save_total_limit: int | None = Field(default=None, ge=1)
    """Keep at most this many checkpoints (oldest deleted first)."""

    resume_from_checkpoint: str | None = None
    """A checkpoint folder to resume from, or "latest" for the newest one in --output_dir."""

    logging_steps: int = Field(default=1, ge=1)
    """Optimizer steps between progress lines when the output is not a terminal."""

    warmup_steps_excluded: int = Field(default=2, ge=0)
    """Optimizer steps at the start left out of the steady-state step time (allocator and kernel warm-up)."""

    collective_timeout_s: float = Field(default=600, gt=0)
    """How long a rank waits in a collective for its peers before the run ends as a timeout: a stalled or
    vanished peer is reported within this limit, not after the process group's 30-minute default. It must
    exceed the longest legitimate wait between two collectives (loading, a checkpoint save)."""

    nvml_sample_interval_s: float = Field(default=0.2, gt=0)
    """How often the NVML sampler reads the GPU's used memory."""

    max_gpu_memory: float | None = Field(default=None, gt=0)
    """Cap this process's GPU memory at this many GiB (torch.cuda.set_per_process_memory_fraction), so that a
    larger card stands for a smaller one: 80 answers for the table's 80 GB cards. The caching allocator then
    raises an out-of-memory error past the cap; NVML still reports the whole card. Ignored without a GPU."""

    memory_snapshot: bool = False
    """Rank 0 writes the CUDA caching allocator's history of the run (every segment and block with its size
    and stream, the latest allocations and frees, no tracebacks) to memory_snapshot.pickle in --output_dir,
    for pytorch.org/memory_viz. Native engine only; ignored without a GPU."""

    dry_run: bool = False
    """Print the resolved configuration and exit without training."""

    @after_validator
    def _check_combinations(self) -> TrainConfig:
        if self.fsdp and self.deepspeed:
            raise ValueError("--fsdp and --deepspeed are exclusive: pick one parallel method")
        unknown = set(self.fsdp.split()) - {"full_shard", "auto_wrap", "offload"}
        if unknown:
            raise ValueError(f"--fsdp {self.fsdp!r}: unsupported option(s) {sorted(unknown)}; "
                             "supported: full_shard, auto_wrap, offload")
        if self.fsdp and "full_shard" not in self.fsdp.split():
            raise ValueError(f"--fsdp {self.fsdp!r}: only full_shard (ZeRO-3-like) sharding is in the table")
        if self.fake_world and (not self.fsdp or self.engine != "native"):
            raise ValueError(f"--fake_world {self.fake_world}: only for FSDP on the native engine (DeepSpeed and "
                             "HF Trainer need real peers)")
        if self.memory_snapshot and self.engine != "native":
            raise ValueError("--memory_snapshot records the native engine's ranks; HF Trainer's loop is its own")
        if self.stack == "2023" and (not self.fsdp or self.engine != "native"):
            raise ValueError("--stack 2023 emulates the table's FSDP1 on the native engine (--fsdp); the 2023 "
                             "DeepSpeed and HF Trainer need the period stack itself (torch 2.0, transformers 4.28)")
        return self

    @property
    def fsdp_offload(self) -> bool:
        return "offload" in self.fsdp.split()


def inert_flags(cfg: TrainConfig, given: set[str]) -> list[str]:
    """One line for each flag in ``given`` (the fields a person typed) that does nothing with the rest of the
    configuration: the run goes ahead as HF Trainer would run it, but nobody is left thinking it was used."""
    notes = []
    if cfg.save_strategy == "no":
        notes += [f"--{name} {getattr(cfg, name)} does nothing with --save_strategy no: no checkpoint is written "
                  "(HF Trainer's rule; add --save_strategy steps to save)"
                  for name in ("save_steps", "save_total_limit") if name in given]
    elif cfg.fake_world:
        notes += [f"--{name} {getattr(cfg, name)} does nothing with --fake_world {cfg.fake_world}: a fake world "
                  "writes no checkpoints (they would hold one rank's shards)"
                  for name in ("save_strategy", "save_steps", "save_total_limit") if name in given]
    if cfg.data_path and "num_examples" in given:
        notes.append(f"--num_examples {cfg.num_examples} does nothing with --data_path: the run takes every "
                     f"example of {cfg.data_path}")
    if not cfg.data_path and "tokenizer_path" in given:
        notes.append(f"--tokenizer_path {cfg.tokenizer_path} does nothing without --data_path: synthetic "
                     "examples are token ids already")
    return notes


def field_help() -> dict[str, str]:
    """Each field's docstring, for ``--help``."""
    return field_docstrings(TrainConfig)
