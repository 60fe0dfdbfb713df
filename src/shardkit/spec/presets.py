"""LLaMA-1 model presets and how a model name or folder resolves to a shape: pure data, no torch."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from .paths import read_text

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
        _check_heads(hf_config, overrides, f"the {preset} preset")
        return ModelSpec(preset, hf_config, None)
    path = Path(cfg.model_name_or_path)
    config_file = path / "config.json"
    if config_file.is_file():
        try:
            hf_config = json.loads(read_text(config_file))
        except json.JSONDecodeError as error:
            raise UsageError(f"{config_file}:{error.lineno}:{error.colno}: not valid JSON ({error.msg})") from None
        if not isinstance(hf_config, dict):
            raise UsageError(f"{config_file}: a JSON {type(hf_config).__name__}, not a model configuration")
        if hf_config.get("model_type") != "llama":
            raise UsageError(f"{config_file}: model_type {hf_config.get('model_type')!r} is not llama")
        has_weights = any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))
        hf_config = {**hf_config, **overrides}
        missing = [key for key in (*SHAPE_OVERRIDES, "vocab_size", "max_position_embeddings") if key not in hf_config]
        if missing:
            raise UsageError(f"{config_file}: no {', '.join(missing)}")
        _check_heads(hf_config, overrides, str(config_file))
        return ModelSpec(path.name, hf_config, str(path) if has_weights else None)
    known = ", ".join(PRESETS)
    raise UsageError(f"--model_name_or_path {cfg.model_name_or_path!r}: not a preset ({known}, or the seed's "
                     "decapoda-research/llama-*-hf names) nor a local folder with config.json; nothing is downloaded")


def _check_heads(hf_config: dict, overrides: dict, source: str) -> None:
    """The attention shapes transformers' LLaMA needs; without these checks the ranks fail on a reshape."""
    hidden, heads = hf_config["hidden_size"], hf_config["num_attention_heads"]
    kv_heads = hf_config.get("num_key_value_heads") or heads
    named = [f"--{k} {overrides[k]}" for k in ("hidden_size", "num_attention_heads") if k in overrides]
    where = " with ".join(named) + f" ({source})" if named else source
    head_dim = hf_config.get("head_dim")
    if not head_dim and hidden % heads:
        raise UsageError(f"{where}: hidden size {hidden} is not a multiple of the {heads} attention heads")
    head_dim = head_dim or hidden // heads
    if head_dim % 2:
        raise UsageError(f"{where}: head size {head_dim} is odd; rotary position embeddings need an even one")
    if heads % kv_heads:
        raise UsageError(f"{where}: {heads} attention heads do not split into {kv_heads} key-value heads")


def parameter_counts(hf_config: dict) -> dict[str, int]:
    """Total parameters and the matmul parameters that enter the FLOPs formula (``results/metrics.py``): every
    Linear weight, i.e. all but the input embedding and the norms. Arithmetic on transformers'
    LlamaForCausalLM (q/k/v/o projections with grouped key-value heads, gate/up/down MLP, two RMSNorms per
    layer and a final one, an untied or tied LM head); tests check it against the built model."""
    hidden, inter = hf_config["hidden_size"], hf_config["intermediate_size"]
    layers, vocab, heads = hf_config["num_hidden_layers"], hf_config["vocab_size"], hf_config["num_attention_heads"]
    head_dim = hf_config.get("head_dim") or hidden // heads
    kv_heads = hf_config.get("num_key_value_heads") or heads
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    attention_bias = heads * head_dim + 2 * kv_heads * head_dim + hidden if hf_config.get("attention_bias") else 0
    mlp = 3 * hidden * inter
    mlp_bias = 2 * inter + hidden if hf_config.get("mlp_bias") else 0
    lm_head = vocab * hidden
    matmul = layers * (attention + mlp) + lm_head
    tied = hf_config.get("tie_word_embeddings", False)
    total = (layers * (attention + attention_bias + mlp + mlp_bias + 2 * hidden) + hidden + vocab * hidden
             + (0 if tied else lm_head))
    return {"total": total, "matmul": matmul}
