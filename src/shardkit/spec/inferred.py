"""The description of a decoder whose family has no rule in spec/architecture.py's table: read off the model
transformers builds from the config.json on the meta device (shapes, no storage; about a second, also for
70B), then held to it. Its decoder layer's parameters, sorted by shape, must be exactly those the description
gives (separate q, k, v and o projections, a gated MLP or Mixtral-style stacked experts, weight-only norms,
optional biases and per-head q/k norms), and its total the model's; anything else is refused in one line
naming the parameters it could not place, rather than planned from a guess.

What this does not read: the order of the layer's blocks and its norm and activation functions. The planner's
activation terms for such a model are LLaMA's (sequential attention then MLP, RMSNorm, SwiGLU);
``shardkit plan --trace`` runs the real modelling code and shows the difference."""

from __future__ import annotations

import functools
import json
from collections import Counter
from dataclasses import dataclass

from ..errors import UsageError
from .architecture import Architecture

NOT_ARCHITECTURE = ("architectures", "transformers_version", "_name_or_path")
"""Keys of a config.json that describe the file, not the model (its torch_dtype stays: transformers 5 builds
in it)."""


def transformers_config(hf_config: dict):
    """The transformers config object of the model's family (``model_type``), through the auto classes."""
    from transformers import AutoConfig

    values = {k: v for k, v in hf_config.items() if k not in (*NOT_ARCHITECTURE, "model_type")}
    return AutoConfig.for_model(hf_config.get("model_type", "llama"), **values)


@dataclass(frozen=True)
class Inferred:
    architecture: Architecture
    decoder_layer: str
    """The FSDP unit's class name (the built model's ``_no_split_modules``)."""


class _Refusal(Exception):
    """Why a config cannot be described, without where it came from (the cache is keyed on the config)."""


def describe(hf_config: dict, source: str, families: str) -> Inferred:
    """``families``: the families with rules, for the refusal."""
    try:
        return _describe(json.dumps(hf_config, sort_keys=True))
    except _Refusal as refusal:
        raise UsageError(f"{source}: model_type {hf_config.get('model_type')!r} (no rule here for it; rules for "
                         f"{families}): {refusal}") from None


@functools.lru_cache(maxsize=64)
def _describe(config_json: str) -> Inferred:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    hf_config = json.loads(config_json)
    model_type = hf_config.get("model_type")
    try:
        config = transformers_config(hf_config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as error:  # noqa: BLE001 - transformers' refusal, whatever its class, is the user's answer
        message = (str(error).strip().splitlines() or [type(error).__name__])[0].split(". ")[0][:160]
        raise _Refusal(f"transformers {transformers.__version__} cannot build it as a causal LM "
                       f"({message})") from None
    _given_or_refused(hf_config, config)
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers or len({type(m) for m in layers}) != 1:
        raise _Refusal(f"expected one decoder layer class in its _no_split_modules {sorted(names)}")
    shapes = [[(n, tuple(p.shape)) for n, p in layer.named_parameters()] for layer in layers]
    if any(sorted(s for _, s in one) != sorted(s for _, s in shapes[0]) for one in shapes):
        raise _Refusal("its decoder layers differ in their parameters (a hybrid the planner does not describe)")
    arch = _from_layer(config, dict(shapes[0]), model, model_type)
    if arch.experts and not arch.experts_per_token:
        raise _Refusal(f"{arch.experts} experts per layer, but no num_experts_per_tok in its config")
    described = Counter(arch.layer_shapes())
    # A q/k norm over the whole projection has a layer norm's shape: placed last, it is the one named.
    placing = sorted(shapes[0], key=lambda named: any(k in named[0] for k in ("q_norm", "k_norm", "q_layernorm",
                                                                               "k_layernorm")))
    unplaced = [n for n, s in placing if not _take(described, s)]
    total = sum(p.numel() for p in model.parameters())
    layer_name, kinds = type(layers[0]).__name__, ("separate q/k/v/o projections, a gated MLP or stacked "
                                                    "experts, weight-only norms")
    if unplaced:
        found = ", ".join(f"{n} {dict(shapes[0])[n]}" for n in unplaced[:3])
        raise _Refusal(f"its decoder layer {layer_name} holds {found}, which the planner's "
                         f"description ({kinds}) does not")
    if +described:
        lacking = ", ".join(str(shape) for shape in list((+described).elements())[:3])
        raise _Refusal(f"its decoder layer {layer_name} has no parameter of shape {lacking}, which "
                         f"the planner's description ({kinds}) gives it")
    if total != arch.params:
        raise _Refusal(f"the model holds {total:,} parameters, the description {arch.params:,} (its "
                         "embeddings, final norm or LM head are not LLaMA's)")
    return Inferred(arch, type(layers[0]).__name__)


SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")


def _given_or_refused(hf_config: dict, config) -> None:
    """Every shape key the family's config has must come from the file, under the family's own name for it
    (GPT-2's n_embd): a default of the config class would plan a model nobody wrote."""
    aliases = getattr(config, "attribute_map", {}) or {}
    missing = [key for key in SHAPE_KEYS if getattr(config, key, None) is not None
               and not isinstance(hf_config.get(key, hf_config.get(aliases.get(key, key))), int)]
    if missing:
        raise _Refusal("no integer " + ", ".join(key if aliases.get(key, key) == key else
                                                 f"{key} ({aliases[key]})" for key in missing))


def _take(counter: Counter, shape: tuple[int, ...]) -> bool:
    if counter[shape] <= 0:
        return False
    counter[shape] -= 1
    return True


def _from_layer(config, layer: dict[str, tuple[int, ...]], model, model_type: str) -> Architecture:
    """The description's values from the layer's parameter names and shapes, the config where they say
    nothing."""
    def named(*suffixes: str) -> list[tuple[int, ...]]:
        return [shape for name, shape in layer.items() if name.endswith(suffixes)]

    hidden, heads = config.hidden_size, config.num_attention_heads
    q = named("q_proj.weight")
    head_dim = q[0][0] // heads if q else getattr(config, "head_dim", None) or hidden // heads
    k = named("k_proj.weight")
    kv_heads = k[0][0] // head_dim if k else getattr(config, "num_key_value_heads", None) or heads
    experts = [shape for name, shape in layer.items() if len(shape) == 3 and "down_proj" in name]
    if experts:
        count, _, intermediate = experts[0]
    else:
        down = named("down_proj.weight")
        count, intermediate = 0, down[0][1] if down else getattr(config, "intermediate_size", None) or 0
    qk_norm = any(shape == (head_dim,) and ("q_norm" in name or "q_layernorm" in name) for name, shape in layer.items())
    norms = sum(1 for name, shape in layer.items()
                if shape == (hidden,) and "norm" in name and name.endswith(".weight") and "q_norm" not in name
                and "k_norm" not in name)
    output = model.get_output_embeddings()
    return Architecture(
        hidden=hidden, intermediate=intermediate, layers=config.num_hidden_layers, heads=heads,
        vocab=config.vocab_size, kv_heads=kv_heads, head_dim=head_dim,
        tied=output is not None and output.weight is model.get_input_embeddings().weight,
        qkv_bias=bool(named("q_proj.bias")), o_bias=bool(named("o_proj.bias", "out_proj.bias")),
        mlp_bias=bool(named("up_proj.bias", "down_proj.bias")), qk_norm=qk_norm, norms_per_layer=norms,
        experts=count, experts_per_token=int(getattr(config, "num_experts_per_tok", 0) or 0) if count else 0,
        logit_softcap=bool(getattr(config, "final_logit_softcapping", None)),
        attention_softcap=bool(getattr(config, "attn_logit_softcapping", None)),
        context=int(getattr(config, "max_position_embeddings", None) or 2048), model_type=model_type,
        eager_only=not getattr(model, "_supports_sdpa", False), inferred=True)
