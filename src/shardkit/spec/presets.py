"""The models the kit knows (the catalogue of published configs, the table's LLaMA-1 presets, tiny) and how a
model name or folder resolves to one: pure data, no torch."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..errors import UsageError
from .architecture import Architecture, architecture_of, decoder_layer_of
from .paths import read_text

CATALOGUE_FILE = Path(__file__).parent / "data" / "models.json"
# For tests and CPU smoke runs: LLaMA's architecture, small enough to train in seconds on 2 cores.
TINY = dict(model_type="llama", hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=256, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
            hidden_act="silu")
SHAPE_OVERRIDES = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads")


@lru_cache(maxsize=1)
def catalogue() -> dict[str, dict]:
    """Hub id -> {family, source, config[, aliases]}: the published configurations in data/models.json."""
    return json.loads(CATALOGUE_FILE.read_text())["models"]


def _names() -> dict[str, str]:
    """Every name a catalogued model answers to, lower-cased -> its hub id: the hub id, the part after the
    owner ('llama-3.1-8b'), and its aliases (the table's 'llama-30b', the seed's decapoda-research names)."""
    names: dict[str, str] = {}
    for hub_id, entry in catalogue().items():
        for name in (hub_id, hub_id.split("/")[-1], *entry.get("aliases", ())):
            names.setdefault(name.lower(), hub_id)
    return names


# The LLaMA-1 shapes of the table (Touvron et al. 2023, Table 2), by the names its recipes use, and tiny.
PRESETS: dict[str, dict] = {
    **{alias: entry["config"] for entry in catalogue().values() for alias in entry.get("aliases", ())
       if "/" not in alias},
    "tiny": TINY,
}
LLAMA1_COMMON = {k: v for k, v in PRESETS["llama-7b"].items() if k not in SHAPE_OVERRIDES}


def preset_name(model_name_or_path: str) -> str | None:
    """'decapoda-research/llama-30b-hf', 'llama-30b' and '30b' all name the llama-30b preset."""
    name = model_name_or_path.lower().rstrip("/").split("/")[-1].removesuffix("-hf")
    if name in PRESETS:
        return name
    if f"llama-{name}" in PRESETS:
        return f"llama-{name}"
    return None


def catalogued(model_name_or_path: str) -> str | None:
    """The hub id of a catalogued model named any way users write it (case-insensitive), or None."""
    name = model_name_or_path.lower().rstrip("/")
    return _names().get(name)


def known_models() -> str:
    return ", ".join([*catalogue(), "tiny"])


@dataclass(frozen=True)
class ModelSpec:
    """Which architecture to build and where its weights come from (None: random init)."""

    name: str
    hf_config: dict
    weights_dir: str | None

    @property
    def architecture(self) -> Architecture:
        return architecture_of(self.hf_config, self.name)


def named_config(model: str) -> tuple[str, dict] | None:
    """A preset's or catalogued model's (name, config.json values), or None for any other name."""
    preset = preset_name(model)
    if preset is not None:
        return preset, PRESETS[preset]
    hub_id = catalogued(model)
    if hub_id is not None:
        return hub_id, catalogue()[hub_id]["config"]
    return None


def read_config(config_file: Path) -> dict:
    try:
        hf_config = json.loads(read_text(config_file))
    except json.JSONDecodeError as error:
        raise UsageError(f"{config_file}:{error.lineno}:{error.colno}: not valid JSON ({error.msg})") from None
    if not isinstance(hf_config, dict):
        raise UsageError(f"{config_file}: a JSON {type(hf_config).__name__}, not a model configuration")
    return hf_config


def resolve_name(model: str, flag: str = "--model_name_or_path") -> tuple[str, dict, str | None]:
    """A preset, a catalogued hub id or a local folder with config.json -> (name, config, weights folder or
    None); raises UsageError for anything else (nothing is fetched)."""
    named = named_config(model)
    if named is not None:
        return named[0], named[1], None
    path = Path(model)
    config_file = path / "config.json"
    if config_file.is_file():
        has_weights = any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))
        return path.name, read_config(config_file), str(path) if has_weights else None
    raise UsageError(f"{flag} {model!r}: not a catalogued model ({known_models()}; `shardkit models` lists them) "
                     "nor a local folder with config.json; nothing is downloaded")


def resolve_model(cfg) -> ModelSpec:
    """The run's model with the configuration's shape overrides applied, checked as transformers will need it."""
    overrides = {k: getattr(cfg, k) for k in SHAPE_OVERRIDES if getattr(cfg, k) is not None}
    name, hf_config, weights = resolve_name(cfg.model_name_or_path)
    if named_config(cfg.model_name_or_path) is None:
        source = str(Path(cfg.model_name_or_path) / "config.json")
    else:
        source = f"the {name} preset" if name in PRESETS else f"the catalogued {name}"
    hf_config = {**hf_config, **overrides}
    arch = architecture_of(hf_config, source)  # a family the planner describes, with every shape key
    _check_heads(hf_config, overrides, source)
    if cfg.attn_implementation != "eager" and not arch.sdpa:
        raise UsageError(f"--attn_implementation {cfg.attn_implementation}: transformers runs {name} "
                         f"({arch.model_type}) with eager attention only; use eager")
    layer = decoder_layer_of(hf_config)
    if cfg.fsdp_transformer_layer_cls_to_wrap not in (None, layer):
        raise UsageError(f"--fsdp_transformer_layer_cls_to_wrap {cfg.fsdp_transformer_layer_cls_to_wrap!r}: "
                         f"{name}'s decoder layer is {layer}")
    return ModelSpec(name, hf_config, weights)


def _check_heads(hf_config: dict, overrides: dict, source: str) -> None:
    """The attention shapes transformers needs; without these checks the ranks fail on a reshape."""
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
    """Total parameters, every matmul weight, and the matmul weights one token meets (the N of the FLOPs
    formula, ``results/metrics.py``; fewer than all with experts): spec/architecture.py's arithmetic on the
    family's modelling code, which tests check against the model transformers builds."""
    return architecture_of(hf_config, "the model").parameter_counts()
