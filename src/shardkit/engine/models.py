"""Model construction for any decoder-only causal LM transformers builds. No distributed imports: sharding is
applied from outside (``fsdp.py``, ``fsdp1.py``, ``zero3.py``, ``hf_trainer.py``)."""

from __future__ import annotations

from ..spec.inferred import transformers_config
from ..spec.presets import ModelSpec


def model_config(spec: ModelSpec, attn_implementation: str):
    """The transformers config of the model's family (``model_type``), through the auto classes."""
    config = transformers_config(spec.hf_config)
    config._attn_implementation = attn_implementation
    config.use_cache = False
    return config


def build_model(spec: ModelSpec, attn_implementation: str, seed: int, meta: bool = False, dtype=None):
    """The one model builder of every engine. ``meta``: shapes only, no storage, so a 65B model costs nothing
    until FSDP has sharded it and materialized this rank's shards. Otherwise the folder's weights, or random
    weights from ``seed``; built while a ZeRO-3 config is alive (HfDeepSpeedConfig, or HF Trainer's
    arguments), transformers creates it inside deepspeed.zero.Init, each parameter partitioned as it is made.
    ``dtype``: the parameters' dtype whatever the folder's config.json says (transformers 5 otherwise takes
    its torch_dtype, float16 for the published LLaMA folders); transformers 5's keyword."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model_config(spec, attn_implementation)
    if meta:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    torch.manual_seed(seed)
    chosen = {} if dtype is None else {"dtype": dtype}
    if spec.weights_dir:
        return AutoModelForCausalLM.from_pretrained(spec.weights_dir, config=config, **chosen)
    return AutoModelForCausalLM.from_config(config, **chosen)


def measured_parameter_counts(model) -> dict[str, int]:
    """Total, matmul and active matmul parameters of a built model: the ground truth the resolved run's
    arithmetic (``spec.architecture``) is tested against. Matmul: every Linear weight (a tied LM head's too)
    and every matrix of stacked experts; active: with experts_per_token of the experts."""
    import torch

    total = sum(p.numel() for p in model.parameters())
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    # Matrices held by modules of their own (transformers 5's routers and fused experts); 1-D ones are norms.
    own = [p for m in model.modules() if not isinstance(m, (torch.nn.Linear, torch.nn.Embedding))
           for p in m.parameters(recurse=False) if p.dim() >= 2]
    experts = sum(p.numel() for p in own if p.dim() == 3)
    routers = sum(p.numel() for p in own if p.dim() == 2)
    per_token = getattr(model.config, "num_experts_per_tok", 0) or 0
    routed = getattr(model.config, "num_local_experts", 0) or 0
    active = matmul + routers + (experts * per_token // routed if routed else experts)
    return {"total": total, "matmul": matmul + routers + experts, "active_matmul": active}


def decoder_layer_class(model) -> type:
    """The model's decoder layer, the FSDP unit: the one class of transformers' ``_no_split_modules`` that the
    model holds (the modules transformers keeps whole when it splits a model across devices)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if len(classes) != 1:
        raise RuntimeError(f"{type(model).__name__}: expected one decoder layer class in _no_split_modules "
                           f"{sorted(names)}, found {sorted(c.__name__ for c in classes)}")
    return classes.pop()


def decoder_layer_class_name(spec: ModelSpec) -> str:
    """The decoder layer's class name without building the model: HF Trainer's wrap flag takes a name."""
    return decoder_layer_class(build_model(spec, "eager", 0, meta=True)).__name__


def decoder_layers(model) -> list:
    layer = decoder_layer_class(model)
    return [m for m in model.modules() if isinstance(m, layer)]


def enable_checkpointing(model, reentrant: bool = False) -> None:
    """Recompute every decoder layer in backward: non-reentrant by default, which composes with FSDP2 and
    ZeRO-3; reentrant is what transformers 4.28 ran (torch 2.0's checkpoint default). transformers 5 renamed
    the method; the old name is all that transformers 4 has."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
