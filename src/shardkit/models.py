"""LLaMA-1 model presets and model construction. No distributed imports: sharding is applied from outside
(``fsdp.py``, ``zero3.py``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

# Published LLaMA-1 shapes (Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models",
# Table 2; intermediate sizes from the released params.json / HF configs). Vocabulary 32000, context 2048.
PRESETS: dict[str, dict] = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "llama-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    "llama-30b": dict(hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52),
    "llama-65b": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64),
    # For tests and CPU smoke runs: same architecture, small enough to train in seconds on 2 cores.
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 vocab_size=256, max_position_embeddings=64),
}
LLAMA1_COMMON = dict(vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                     hidden_act="silu")
SHAPE_OVERRIDES = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads")


def preset_name(model_name_or_path: str) -> str | None:
    """'decapoda-research/llama-30b-hf', 'llama-30b' and '30b' all name the llama-30b preset."""
    name = model_name_or_path.lower().rstrip("/").split("/")[-1].removesuffix("-hf")
    if name in PRESETS:
        return name
    if f"llama-{name}" in PRESETS:
        return f"llama-{name}"
    return None


@dataclass(frozen=True)
class ModelSpec:
    """Which architecture to build and where its weights come from (None: random init)."""

    name: str
    hf_config: dict
    weights_dir: str | None


def resolve_model(cfg) -> ModelSpec:
    """Preset or local folder -> ModelSpec; raises UsageError for anything else (nothing is fetched)."""
    overrides = {k: getattr(cfg, k) for k in SHAPE_OVERRIDES if getattr(cfg, k) is not None}
    preset = preset_name(cfg.model_name_or_path)
    if preset is not None:
        hf_config = {**LLAMA1_COMMON, **PRESETS[preset], **overrides}
        return ModelSpec(preset, hf_config, None)
    path = Path(cfg.model_name_or_path)
    config_file = path / "config.json"
    if config_file.is_file():
        try:
            hf_config = json.loads(config_file.read_text())
        except json.JSONDecodeError as error:
            raise UsageError(f"{config_file}:{error.lineno}:{error.colno}: not valid JSON ({error.msg})") from None
        if hf_config.get("model_type") != "llama":
            raise UsageError(f"{config_file}: model_type {hf_config.get('model_type')!r} is not llama")
        has_weights = any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))
        return ModelSpec(path.name, {**hf_config, **overrides}, str(path) if has_weights else None)
    known = ", ".join(PRESETS)
    raise UsageError(f"--model_name_or_path {cfg.model_name_or_path!r}: not a preset ({known}, or the seed's "
                     "decapoda-research/llama-*-hf names) nor a local folder with config.json; nothing is downloaded")


def llama_config(spec: ModelSpec, attn_implementation: str):
    from transformers import LlamaConfig

    values = {k: v for k, v in spec.hf_config.items() if k not in ("architectures", "transformers_version")}
    values.setdefault("num_key_value_heads", values["num_attention_heads"])
    config = LlamaConfig(**values)
    config._attn_implementation = attn_implementation
    config.use_cache = False
    return config


def build_on_meta(spec: ModelSpec, attn_implementation: str):
    """The model with no storage: shapes only, so a 65B model costs nothing until it is sharded."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(llama_config(spec, attn_implementation))


def parameter_counts(model) -> dict[str, int]:
    """Total parameters and the matmul parameters that enter the FLOPs formula (``metrics.py``): every
    Linear weight, i.e. all but the input embedding and the norms."""
    import torch

    total = sum(p.numel() for p in model.parameters())
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return {"total": total, "matmul": matmul}


def decoder_layers(model) -> list:
    return list(model.model.layers)


def enable_checkpointing(model) -> None:
    """Recompute every decoder layer in backward (non-reentrant, which composes with FSDP2 and ZeRO-3).
    transformers 5 renamed the method; the old name is all that transformers 4 has."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
