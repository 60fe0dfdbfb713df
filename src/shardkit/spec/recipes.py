"""Recipes: one env file per table row (recipes/*.env), read into a typed Recipe, rendered as the seed's
command line with the row's values filled in. One function renders every recipe."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from ..errors import UsageError
from .architecture import decoder_layer_of
from .parallelism import NAMES, Parallelism
from .paths import read_text
from .presets import PRESETS, catalogued, parameter_counts, preset_name, resolve_name
from .typed import STRICT, ValidationError, field_names, problems

# The repository's recipes/ (an image sets SHARDKIT_RECIPES to where it copied them).
RECIPES_DIR = Path(os.environ.get("SHARDKIT_RECIPES", Path(__file__).resolve().parents[3] / "recipes"))
# The DeepSpeed JSON of each ZeRO-3 method, relative to recipes/: the seed's (optimizer and parameters
# offloaded to pinned CPU memory) and the same without offload.
DEEPSPEED_CONFIGS = {False: "configs/zero3_no_offload.json", True: "configs/deepspeed_config.json"}
_LINE = re.compile(r"^([A-Z][A-Z0-9_]*)=(.*)$")
# The table rows' file names: model_method_Ngpu_bsB[_nockpt] (tiny recipes count CPU ranks: Ncpu).
_NAME = re.compile(r"^(?P<model>[a-z0-9.-]+)_(?P<method>[a-z0-9-]+)_(?P<gpus>\d+)(?:gpu|cpu)_bs(?P<batch>\d+)"
                   r"(?P<nockpt>_nockpt)?$")

Method = Literal[NAMES]  # type: ignore[valid-type]


class Recipe(BaseModel, **STRICT):
    """One row of the table. Keys are the env file's, lower-cased; defaults are the values the table leaves
    out, each with where it comes from."""

    name: str
    """The file name without .env: model_method_Ngpu_bsB[_nockpt]. A name of that shape must agree with the
    values (a file named for 8 GPUs that says GPUS=4 is refused)."""

    model: str
    """A preset (llama-30b, or the seed's hub name decapoda-research/llama-30b-hf), a catalogued hub id
    (meta-llama/Llama-3.1-8B; shardkit models lists them) or a local folder with a config.json."""

    method: Method
    """fsdp, fsdp_offload (the table's "FSDP + offload"), zero3_offload ("Deepspeed + Zero 3 + Offload"), or
    zero3 (no offload; tiny recipes only, the table has no such row)."""

    gpus: int = Field(ge=1)
    """Ranks: GPUs on a GPU machine, CPU processes on a machine without one."""

    batch: int = Field(ge=1)
    """Per-device micro-batch (the table's "Batch size")."""

    grad_ckpt: bool
    """Gradient checkpointing (the table's "Grad Ckp")."""

    grad_accum: int | None = Field(default=None, ge=1)
    """Micro-batches per step. Unset: the seed's command line for the method, 8 for FSDP and 2 for DeepSpeed."""

    attn: Literal["eager", "sdpa", "flash_attention_2"] = "eager"
    """Attention kernel. eager: transformers 4.28's LlamaAttention, what the 2023 stack ran, had no other."""

    deepspeed_config: str | None = None
    """DeepSpeed JSON, relative to recipes/. Unset: the seed's (configs/deepspeed_config.json, optimizer and
    parameters offloaded) for zero3_offload, configs/zero3_no_offload.json for zero3. Its offload sections
    must agree with METHOD (checked when the run is resolved)."""

    bf16: bool = True
    """The seed's --bf16 True."""

    tf32: bool = True
    """The seed's --tf32 True."""

    learning_rate: float = 2e-5
    """The seed's --learning_rate 2e-5 (with --warmup_ratio 0.03 and --weight_decay 0.)."""

    epochs: float = 3
    """The seed's --num_train_epochs 3."""

    save_steps: int = 100
    """The seed's --save_steps 100 with --save_total_limit 1: saves are part of the table's Time."""

    save: bool = True
    """Whether to checkpoint at all (tiny recipes don't)."""

    seq_len: int | None = None
    """Tokens per example: unset is the model's context, 2048 for LLaMA (the seed's examples)."""

    num_examples: int = 6000
    """The seed's 6000 examples."""

    max_steps: int | None = None
    """Stop after this many optimizer steps (tiny recipes); unset: the full 3 epochs."""

    seed: int = 42
    """Seed of weights, data and shuffling."""

    description: str = ""
    """The table row this recipe reproduces, as printed."""

    @property
    def parallelism(self) -> Parallelism:
        return Parallelism.from_name(self.method)

    @property
    def accumulation(self) -> int:
        return self.grad_accum or self.parallelism.seed_accumulation

    @property
    def deepspeed_file(self) -> str:
        return self.deepspeed_config or DEEPSPEED_CONFIGS[self.parallelism.offload]


def recipe_path(name: str, folder: Path = RECIPES_DIR) -> Path:
    path = Path(name)
    if path.suffix == ".env" and path.is_file():
        return path
    candidate = folder / f"{name}.env"
    if not candidate.is_file():
        known = ", ".join(sorted(p.stem for p in folder.glob("*.env"))[:6])
        raise UsageError(f"unknown recipe {name!r}: no {candidate} (e.g. {known}; `shardkit recipes` lists all)")
    return candidate


def load_recipe(name: str, folder: Path = RECIPES_DIR) -> Recipe:
    """Parse KEY=VALUE lines (# comments, blank lines); a malformed line or unknown key names file and line."""
    path = recipe_path(name, folder)
    values: dict[str, str] = {}
    description = []
    lines: dict[str, int] = {}
    keys = [k for k in field_names(Recipe) if k not in ("name", "description")]
    for number, raw in enumerate(read_text(path).splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            description.append(line.lstrip("# "))
            continue
        match = _LINE.match(line)
        if not match:
            raise UsageError(f"{path}:{number}: expected KEY=VALUE, got {raw!r}")
        key = match.group(1).lower()
        if key not in keys:
            raise UsageError(f"{path}:{number}: unknown key {match.group(1)} (known: {', '.join(map(str.upper, keys))})")
        if key in values:
            raise UsageError(f"{path}:{number}: {match.group(1)} given twice")
        values[key] = match.group(2).strip().strip('"').strip("'")
        lines[key] = number
    try:
        recipe = Recipe(name=path.stem, description=" ".join(description), **values)
    except ValidationError as error:
        first = problems(error, values)[0]
        key = str(first["loc"][0]) if first["loc"] else ""
        where = f"{path}:{lines[key]}" if key in lines else str(path)
        raise UsageError(f"{where}: {key.upper()} {first['input']!r}: {first['msg']}") from None
    _check_name(recipe, path, lines)
    return recipe


def model_identity(model: str) -> str:
    """One name per model however it is written: the preset ('llama-30b' for the seed's decapoda name), the
    catalogue's hub id ('llama-3.1-8b' in a file name is meta-llama/Llama-3.1-8B), or the text itself."""
    return preset_name(model) or catalogued(model) or model


def _name_parts(name: str) -> dict | None:
    """What a table-row-style name says (model, method, ranks, batch, checkpointing), or None for another name."""
    match = _NAME.match(name)
    if not match or match["method"].replace("-", "_") not in NAMES:
        return None
    return {"model": model_identity(match["model"]), "method": match["method"].replace("-", "_"),
            "gpus": int(match["gpus"]), "batch": int(match["batch"]), "grad_ckpt": not match["nockpt"]}


def _check_name(recipe: Recipe, path: Path, lines: dict[str, int]) -> None:
    """A file named like a table row must hold that row: a name that says 8 GPUs over GPUS=4 would put the
    results, the verdict and the reference row of one configuration on another."""
    said = _name_parts(recipe.name)
    if said is None:
        return
    holds = {"model": model_identity(recipe.model), "method": recipe.method, "gpus": recipe.gpus,
             "batch": recipe.batch, "grad_ckpt": recipe.grad_ckpt}
    for key, value in said.items():
        if holds[key] != value:
            where = f"{path}:{lines[key]}" if key in lines else str(path)
            raise UsageError(f"{where}: {key.upper()}={getattr(recipe, key)} contradicts the file name {recipe.name} "
                             f"(which says {value}); rename the file or fix the value")


def all_names(folder: Path = RECIPES_DIR) -> list[str]:
    """Recipe names by model size, then GPUs, then batch (then method, checkpointing before none); names not
    shaped like a table row's come last, alphabetically."""
    return sorted((p.stem for p in folder.glob("*.env")), key=_natural_order)


def _natural_order(name: str) -> tuple:
    parts = _name_parts(name)
    if parts is None or parts["model"] not in PRESETS:
        return (1, name)
    size = parameter_counts(PRESETS[parts["model"]])["total"]
    return (0, size, parts["gpus"], parts["batch"], NAMES.index(parts["method"]), not parts["grad_ckpt"], name)


def seed_argv(recipe: Recipe, output_dir: str, folder: Path = RECIPES_DIR) -> list[str]:
    """The seed's command line (finetune_llama.py flags, in the seed's order) with the row's values."""
    argv = ["--model_name_or_path", recipe.model, "--bf16", str(recipe.bf16), "--output_dir", output_dir,
            "--num_train_epochs", f"{recipe.epochs:g}", "--per_device_train_batch_size", str(recipe.batch),
            "--gradient_accumulation_steps", str(recipe.accumulation), "--evaluation_strategy", "no",
            "--save_strategy", "steps" if recipe.save else "no", "--save_steps", str(recipe.save_steps),
            "--save_total_limit", "1", "--learning_rate", f"{recipe.learning_rate:g}", "--weight_decay", "0.",
            "--warmup_ratio", "0.03"]
    argv += method_flags(recipe.parallelism, folder / recipe.deepspeed_file,
                         decoder_layer_of(resolve_name(recipe.model, "model")[1]))
    argv += ["--gradient_checkpointing", str(recipe.grad_ckpt), "--tf32", str(recipe.tf32)]
    argv += ["--attn_implementation", recipe.attn, "--run_name", recipe.name, "--seed", str(recipe.seed),
             "--num_examples", str(recipe.num_examples)]
    if recipe.seq_len:
        argv += ["--model_max_length", str(recipe.seq_len)]
    if recipe.max_steps:
        argv += ["--max_steps", str(recipe.max_steps)]
    return argv


def method_flags(parallelism: Parallelism, deepspeed_file: Path | None = None,
                 decoder_layer: str = "LlamaDecoderLayer") -> list[str]:
    """The seed's flags for a parallel method (the one place a method becomes flags); ``decoder_layer``: the
    model's FSDP unit (spec.architecture.decoder_layer_of)."""
    if parallelism.kind == "fsdp":
        options = "full_shard auto_wrap offload" if parallelism.offload else "full_shard auto_wrap"
        return ["--fsdp", options, "--fsdp_transformer_layer_cls_to_wrap", decoder_layer]
    file = deepspeed_file or RECIPES_DIR / DEEPSPEED_CONFIGS[parallelism.offload]
    return ["--deepspeed", str(Path(file).resolve())]


def torchrun_command(recipe: Recipe, output_dir: str) -> str:
    """What to type in recipes/ to run the row the seed's way."""
    import shlex

    return " ".join(["torchrun", f"--nproc_per_node={recipe.gpus}", "--master_port=22100", "finetune_llama.py",
                     *map(shlex.quote, seed_argv(recipe, output_dir))])
