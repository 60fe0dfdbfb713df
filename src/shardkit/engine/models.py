"""Model construction. No distributed imports: sharding is applied from outside (``fsdp.py``, ``zero3.py``,
``hf_trainer.py``)."""

from __future__ import annotations

from ..spec.presets import ModelSpec


def llama_config(spec: ModelSpec, attn_implementation: str):
    from transformers import LlamaConfig

    values = {k: v for k, v in spec.hf_config.items() if k not in ("architectures", "transformers_version")}
    values.setdefault("num_key_value_heads", values["num_attention_heads"])
    config = LlamaConfig(**values)
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
    from transformers import LlamaForCausalLM

    config = llama_config(spec, attn_implementation)
    if meta:
        with torch.device("meta"):
            return LlamaForCausalLM(config)
    torch.manual_seed(seed)
    chosen = {} if dtype is None else {"dtype": dtype}
    if spec.weights_dir:
        return LlamaForCausalLM.from_pretrained(spec.weights_dir, config=config, **chosen)
    return LlamaForCausalLM._from_config(config, **chosen)


def measured_parameter_counts(model) -> dict[str, int]:
    """Total and matmul (every Linear weight) parameters of a built model: the ground truth the resolved
    run's arithmetic (``spec.presets.parameter_counts``) is tested against."""
    import torch

    total = sum(p.numel() for p in model.parameters())
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return {"total": total, "matmul": matmul}


def decoder_layers(model) -> list:
    return list(model.model.layers)


def enable_checkpointing(model, reentrant: bool = False) -> None:
    """Recompute every decoder layer in backward: non-reentrant by default, which composes with FSDP2 and
    ZeRO-3; reentrant is what transformers 4.28 ran (torch 2.0's checkpoint default). transformers 5 renamed
    the method; the old name is all that transformers 4 has."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
