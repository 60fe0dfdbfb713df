"""One description of a decoder-only causal LM, read from its config.json: what the planner's terms and the
resolved run's parameter counts need, with no torch import for the families in its table.

transformers' modelling code decides the parameter shapes; this module restates them per family (the
``FAMILIES`` table) from the config keys each family's modelling file reads, and tests/test_models.py checks
every catalogued model against ``AutoModelForCausalLM.from_config`` on the meta device, parameter for
parameter count. A family not in the table is read off the model transformers builds (spec/inferred.py),
and refused in one line where its layer is not one this description can hold."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from ..errors import UsageError


@dataclass(frozen=True)
class Family:
    """What a family's modelling code builds beyond the keys every decoder config has."""

    qkv_bias: bool | None = None
    """Biases on q, k and v whatever the config says (Qwen2); None: the config's ``attention_bias``."""
    qk_norm: bool = False
    """An RMSNorm over each head's queries and keys (Qwen3): head_dim parameters each."""
    norms_per_layer: int = 2
    """RMSNorms in each decoder layer (Gemma 2 normalizes before and after attention and MLP: four)."""
    tied_default: bool = False
    """tie_word_embeddings when the config.json does not say (the config class's default)."""
    head_dim_default: int | None = None
    """The config class's head_dim default; None: hidden / heads."""
    moe: bool = False
    """Experts instead of one MLP (Mixtral: num_local_experts, num_experts_per_tok)."""
    in_2023_stack: bool = False
    """transformers 4.28 (the table's stack) has this family's modelling code."""
    sdpa: bool = True
    """transformers runs the family with SDPA (Gemma 2's logit soft-capping is eager only in transformers 5)."""
    decoder_layer: str = ""
    """The decoder layer's class, the FSDP unit (the model's ``_no_split_modules``; a test checks it)."""


# Each from the family's transformers modelling and configuration files (transformers 5).
FAMILIES: dict[str, Family] = {
    "llama": Family(in_2023_stack=True, decoder_layer="LlamaDecoderLayer"),
    "mistral": Family(decoder_layer="MistralDecoderLayer"),
    "mixtral": Family(moe=True, decoder_layer="MixtralDecoderLayer"),
    "qwen2": Family(qkv_bias=True, decoder_layer="Qwen2DecoderLayer"),
    "qwen3": Family(qk_norm=True, head_dim_default=128, decoder_layer="Qwen3DecoderLayer"),
    "gemma": Family(tied_default=True, head_dim_default=256, decoder_layer="GemmaDecoderLayer"),
    "gemma2": Family(norms_per_layer=4, sdpa=False, tied_default=True, head_dim_default=256, decoder_layer="Gemma2DecoderLayer"),
}


@dataclass(frozen=True)
class Architecture:
    """A decoder-only model's shapes. The first five fields are those of every LLaMA; the rest default to
    LLaMA-1's (as many key-value heads as heads, head_dim = hidden / heads, untied, no biases, SwiGLU, two
    RMSNorms per layer, dense)."""

    hidden: int
    intermediate: int
    """The MLP's width; with experts, each expert's."""
    layers: int
    heads: int
    vocab: int
    kv_heads: int = 0
    """Key-value heads (grouped-query attention: fewer than heads; 1 is multi-query); 0: as many as heads."""
    head_dim: int = 0
    """0: hidden / heads."""
    tied: bool = False
    """The LM head is the input embedding (one matrix, one gradient)."""
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    norms_per_layer: int = 2
    experts: int = 0
    """Routed experts per layer (0: a dense MLP)."""
    experts_per_token: int = 0
    logit_softcap: bool = False
    """The logits pass through cap x tanh(logits / cap) before the loss (Gemma 2's final_logit_softcapping)."""
    attention_softcap: bool = False
    """The attention scores pass through cap x tanh(scores / cap) (Gemma 2's attn_logit_softcapping)."""
    context: int = 2048
    """max_position_embeddings: the longest sequence the model was made for."""
    model_type: str = "llama"
    eager_only: bool = False
    """transformers runs the model with eager attention only (no SDPA path in its modelling code)."""
    inferred: bool = False
    """Read off the model transformers builds (a family with no rule in ``FAMILIES``): its parameters are
    exact, its activation terms LLaMA's (spec/inferred.py says what is not read)."""

    @property
    def sdpa(self) -> bool:
        return not self.eager_only

    def __post_init__(self):
        if not self.kv_heads:
            object.__setattr__(self, "kv_heads", self.heads)
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def moe(self) -> bool:
        return self.experts > 0

    def layer_shapes(self) -> list[tuple[int, ...]]:
        """One decoder layer's parameters as transformers 5 holds them (rows first, as FSDP2 shards them)."""
        h, i, q, kv = self.hidden, self.intermediate, self.q_width, self.kv_width
        shapes: list[tuple[int, ...]] = [(q, h), (kv, h), (kv, h), (h, q)]
        if self.qkv_bias:
            shapes += [(q,), (kv,), (kv,)]
        if self.o_bias:
            shapes.append((h,))
        if self.qk_norm:
            shapes += [(self.head_dim,), (self.head_dim,)]
        if self.moe:
            # The router, then the experts fused into two 3-D parameters (transformers 5 MixtralExperts).
            shapes += [(self.experts, h), (self.experts, 2 * i, h), (self.experts, h, i)]
        else:
            shapes += [(i, h), (i, h), (h, i)]
            if self.mlp_bias:
                shapes += [(i,), (i,), (h,)]
        return shapes + [(h,)] * self.norms_per_layer

    def units(self) -> list[list[tuple[int, ...]]]:
        """Parameter shapes grouped by FSDP unit: one unit per decoder layer, then the root (embedding, final
        norm and, untied, the LM head)."""
        root = [(self.vocab, self.hidden), (self.hidden,)] + ([] if self.tied else [(self.vocab, self.hidden)])
        return [self.layer_shapes()] * self.layers + [root]

    @property
    def layer_params(self) -> int:
        return sum(_numel(d) for d in self.layer_shapes())

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def root_params(self) -> int:
        """The root FSDP unit: embedding, final norm and an untied LM head."""
        return (1 if self.tied else 2) * self.embedding_params + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.root_params

    @property
    def layer_matmul_params(self) -> int:
        """A layer's weights that multiply activations: every matrix but the norms and biases."""
        return sum(_numel(d) for d in self.layer_shapes() if len(d) > 1)

    @property
    def matmul_params(self) -> int:
        """Every matmul weight, the LM head included (tied or not; the input embedding is a lookup)."""
        return self.layers * self.layer_matmul_params + self.embedding_params

    @property
    def active_matmul_params(self) -> int:
        """The matmul weights one token meets: the N of PaLM's 6N + 12LHS (results/metrics.py). With experts,
        only experts_per_token of them (and the router)."""
        if not self.moe:
            return self.matmul_params
        expert = 3 * self.hidden * self.intermediate
        return self.matmul_params - self.layers * (self.experts - self.experts_per_token) * expert

    @property
    def largest_module_params(self) -> int:
        """The biggest single module's parameters: what ZeRO-3 gathers at once at least."""
        mlp = self.experts * 3 * self.hidden * self.intermediate if self.moe else self.hidden * self.intermediate
        return max(self.embedding_params, mlp, self.hidden * self.q_width)

    def parameter_counts(self) -> dict[str, int]:
        return {"total": self.params, "matmul": self.matmul_params, "active_matmul": self.active_matmul_params}

    def describe(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def with_overrides(self, **values) -> Architecture:
        return replace(self, **values)


def _numel(dims: tuple[int, ...]) -> int:
    out = 1
    for d in dims:
        out *= d
    return out


def decoder_layer_of(hf_config: dict) -> str:
    """The decoder layer class name of a config's family (for HF Trainer's wrap flag, which takes a name)."""
    family = FAMILIES.get(hf_config.get("model_type", "llama"))
    if family is not None:
        return family.decoder_layer
    from .inferred import describe

    return describe(hf_config, "the model", supported_families()).decoder_layer


def supported_families() -> str:
    return ", ".join(FAMILIES)


def architecture_of(hf_config: dict, source: str) -> Architecture:
    """The description of a config.json's model; ``source`` names it in errors (a file, a catalogue id)."""
    model_type = hf_config.get("model_type", "llama")
    if not isinstance(model_type, str):
        raise UsageError(f"{source}: model_type {model_type!r} is not a name")
    family = FAMILIES.get(model_type)
    if family is None:  # its own config class reads its keys (GPT-2's n_embd, ...)
        from .inferred import describe

        return describe(hf_config, source, supported_families()).architecture
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size") if not isinstance(hf_config.get(k), int)]
    if missing:  # a family's defaults would otherwise plan a model nobody wrote
        raise UsageError(f"{source}: no integer {', '.join(missing)}")
    heads = hf_config["num_attention_heads"]
    head_dim = hf_config.get("head_dim") or family.head_dim_default or 0
    attention_bias = bool(hf_config.get("attention_bias", False))
    experts = int(hf_config.get("num_local_experts") or 0) if family.moe else 0
    return Architecture(
        hidden=hf_config["hidden_size"], intermediate=hf_config["intermediate_size"],
        layers=hf_config["num_hidden_layers"], heads=heads, vocab=hf_config["vocab_size"],
        kv_heads=hf_config.get("num_key_value_heads") or heads, head_dim=head_dim,
        tied=bool(hf_config.get("tie_word_embeddings", family.tied_default)),
        qkv_bias=family.qkv_bias if family.qkv_bias is not None else attention_bias,
        # Qwen2's bias is on q, k and v only; LLaMA's attention_bias puts one on o_proj too.
        o_bias=attention_bias if family.qkv_bias is None else False,
        mlp_bias=bool(hf_config.get("mlp_bias", False)), qk_norm=family.qk_norm,
        norms_per_layer=family.norms_per_layer, experts=experts,
        experts_per_token=int(hf_config.get("num_experts_per_tok") or 0) if experts else 0,
        logit_softcap=bool(hf_config.get("final_logit_softcapping")),
        attention_softcap=bool(hf_config.get("attn_logit_softcapping")),
        context=int(hf_config.get("max_position_embeddings") or 2048), model_type=model_type,
        eager_only=not family.sdpa)


TABLE_SEQ_LEN = 2048
"""The table's examples: 6000 of 2048 tokens."""


def default_seq_len(arch: Architecture) -> int:
    """Tokens per sequence when none is given: the table's 2048, or the model's context where it is shorter
    (a 128K context is what a model can read, not what a fine-tune's examples hold)."""
    return min(arch.context, TABLE_SEQ_LEN)


def runs_on_2023_stack(arch: Architecture) -> bool:
    """transformers 4.28 (the table's stack) builds LLaMA with as many key-value heads as heads, nothing else."""
    family = FAMILIES.get(arch.model_type)
    return family is not None and family.in_2023_stack and arch.kv_heads == arch.heads and arch.head_dim * arch.heads \
        == arch.hidden and not (arch.qkv_bias or arch.mlp_bias or arch.tied)
