"""Peak memory per GPU of one training rank, term by term, for FSDP and ZeRO-3 on any decoder the kit
describes (spec/architecture.py: grouped-query attention, head_dim, tied embeddings, biases, experts).

Pure arithmetic on the model's shape and the run's settings: no torch import, so the planner answers in
milliseconds on any machine. Every term says where its bytes live (GPU or host), whether the caching
allocator must find them (``live``) or only fills free memory with them (``elastic``), and the source of
its formula. docs/planner.md explains each term and shows the calibration against the table.

Notation (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
section 4): T = b*s tokens per micro-batch, h hidden, I intermediate (MLP), a heads, L layers, V vocabulary,
P parameters, N ranks sharing the model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from math import prod
from typing import Literal

from ..spec.architecture import Architecture
from ..spec.parallelism import Parallelism

Stack = Literal["2023", "today"]
Attention = Literal["eager", "sdpa"]
Allocator = Literal["default", "expandable"]
ALLOCATORS: tuple[str, ...] = ("default", "expandable")

GROUPS = ("parameters", "gradients", "optimizer states", "activations", "logits and loss",
          "communication and prefetch", "caching allocator", "runtime", "host")
STACKS: dict[str, str] = {
    "2023": "the table's stack: HF Trainer 4.28 on torch 2.0 FSDP (FlatParameter, FSDP1) or DeepSpeed 0.9 "
            "ZeRO-3, eager attention",
    "today": "shardkit's native engine: torch FSDP2 (fully_shard) or DeepSpeed ZeRO-3, transformers 5",
}

# transformers' "Model training anatomy" guide measures what CUDA kernels take as soon as torch touches the
# GPU: "the kernels alone take up 1.3GB of GPU memory" (1343 MB in its printout). It is outside the caching
# allocator, so nvidia-smi (the table's instrument) counts it and torch.cuda.max_memory_reserved does not.
CUDA_CONTEXT_BYTES = 1343 * 2**20

# Bytes of the attention-score tensors (a*b*s*s elements each) that eager attention saves for backward.
# transformers 4.28 LlamaAttention: scores + mask are clamped with torch.max (saves its bf16 input),
# softmax in fp32 (saves its fp32 output), cast back to bf16 (saved by the matmul with V): 2 + 4 + 2.
# transformers 5 eager_attention_forward has no clamp: 4 + 2.
_SCORE_BYTES_SAVED = {"2023": 8, "today": 6}
# The loss's vocabulary-sized tensors at their peak (the loss backward), in bytes per token per vocab entry.
# 4.28 LlamaForCausalLM: bf16 logits, a shifted contiguous copy and log_softmax in bf16, then the gradients
# of log_softmax's output and input and of the logits: 8. transformers 5's ForCausalLMLoss upcasts the
# logits to fp32 first (logits.float()), so log_softmax, its saved output and both gradients are fp32: 12.
_LOSS_BYTES = {"2023": 8, "today": 12}


@dataclass(frozen=True)
class Workload:
    """One rank's share of a run: everything the terms depend on."""

    shape: Architecture
    parallelism: Parallelism
    gpus: int
    micro_batch: int
    seq_len: int
    grad_ckpt: bool
    accumulation: int
    attention: Attention = "eager"
    # ZeRO-3 knobs; None means the seed config's value: "auto" as HF fills it (hidden^2, 0.9 hidden^2) and
    # the 1e9 the config sets.
    reduce_bucket_size: int | None = None
    prefetch_bucket_size: int | None = None
    max_live_parameters: int = 10**9
    sub_group_size: int = 10**9
    # The run's length, for the time model; defaults are the seed's: 6000 examples, 3 epochs, a checkpoint
    # every 100 optimizer steps (None: no checkpoints).
    examples: int = 6000
    epochs: float = 3
    save_every: int | None = 100
    allocator: Allocator = "default"
    """The caching allocator's configuration: default, or expandable segments (PYTORCH_CUDA_ALLOC_CONF=
    expandable_segments:True, what the native engine runs on today's stack unless told otherwise)."""

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len

    @property
    def method(self) -> str:
        return self.parallelism.kind

    @property
    def offload(self) -> bool:
        return self.parallelism.offload


@dataclass(frozen=True)
class Term:
    """One component of the memory. ``phase``: None for bytes held throughout the step; "layer" for those
    held only while a decoder layer runs its backward, "loss" for those held only around the loss, "load"
    for those held only while the model is loaded, before training. Phases never overlap in time, so the
    peak counts the largest of them."""

    group: str
    name: str
    bytes: int
    device: Literal["gpu", "host"]
    # kind: "live" bytes tensors must hold at once (allocated); "elastic" bytes the allocator takes only while
    # the card has room (2023 all-gathers issued ahead); "reserve" bytes the caching allocator keeps cached
    # beyond live tensors (reserved, not allocated). Elastic and reserve bytes are given back when an
    # allocation fails (the allocator frees its cached blocks and retries), so only live bytes decide OOM.
    kind: Literal["live", "elastic", "reserve"]
    phase: Literal["layer", "loss", "root", "load"] | None
    source: str
    pinned: bool = False
    """Host bytes in page-locked memory (offloaded parameters, master copies and gradients; not Adam's moments,
    which the optimizers allocate with zeros_like): the container needs that much memlock."""

    def to_dict(self) -> dict:
        return asdict(self)


def _term(group, name, value, source, device="gpu", kind="live", phase=None, pinned=False) -> Term:
    return Term(group, name, int(value), device, kind, phase, source, pinned and device == "host")


def local_elements(w: Workload, stack: Stack, rank: int = 0) -> int:
    """Parameter elements rank ``rank`` holds, exactly as each engine splits them.

    FSDP2 splits every parameter on dim 0 like torch.chunk (ceil(rows / N) rows per rank, the last ranks
    get fewer or none); FSDP1 flattens each unit into one FlatParameter padded to a multiple of N and gives
    every rank an equal slice; ZeRO-3 pads each parameter to a multiple of N and gives every rank an equal
    slice (ds_tensor)."""
    n, total = w.gpus, 0
    for unit in w.shape.units():
        if w.method == "zero3":
            total += sum(-(-prod(d) // n) for d in unit)
        elif stack == "2023":
            total += -(-sum(prod(d) for d in unit) // n)
        else:
            for dims in unit:
                rows = -(-dims[0] // n)
                mine = max(0, min(dims[0], (rank + 1) * rows) - rank * rows)
                total += mine * prod(dims[1:])
    return total


def model_state_terms(w: Workload, stack: Stack) -> list[Term]:
    """Parameters, gradients and optimizer states (ZeRO paper: Rajbhandari et al. 2020, section 3.1: mixed
    precision Adam holds 2 + 2 + 12 bytes per parameter, divided by N once fully sharded)."""
    local = local_elements(w, stack)  # rank 0's share: the largest
    where = "host" if w.offload else "gpu"
    if w.method == "fsdp":
        # zero_grad(set_to_none=True) ends every step without gradients, so with one micro-batch per step none
        # exists yet while the loss's backward runs, the first thing the backward does: the shards are held in
        # the layers' phase, not the loss's. With accumulation, earlier micro-batches' gradients are there.
        grads_phase = "layer" if w.accumulation == 1 else None
        grads_when = ("; none yet in the loss's backward (one micro-batch per step, zero_grad(set_to_none=True))"
                      if grads_phase else "")
        sharded = ("FSDP keeps the fp32 parameters sharded (FlatParameter in FSDP1, DTensor in FSDP2); "
                   "bf16 exists only while a unit is unsharded")
        return [
            _term("parameters", "fp32 parameter shard", 4 * local, sharded, where, pinned=True),
            _term("gradients", "fp32 gradient shard", 4 * local,
                  "reduce-scattered gradients are kept in the parameters' dtype (FSDP1 _cast_grad_to_param_dtype; "
                  "FSDP2 accumulates into the fp32 sharded .grad)" + grads_when, where, phase=grads_phase,
                  pinned=True),
            _term("optimizer states", "Adam exp_avg + exp_avg_sq, fp32", 8 * local,
                  "torch.optim.AdamW state (ZeRO paper K=12 less the fp32 master copy, which here is the "
                  "parameter itself)", where),
        ]
    terms = [
        _term("parameters", "bf16 parameter partition", 2 * local,
              "ZeRO-3 partitions the bf16 parameters (ds_tensor); offload_param keeps them in pinned host memory",
              where, pinned=True),
        _term("optimizer states", "fp32 master partition", 4 * local, "ZeRO paper: the fp32 copy Adam updates",
              where, pinned=True),
        _term("optimizer states", "Adam exp_avg + exp_avg_sq, fp32", 8 * local,
              "DeepSpeedCPUAdam (offload) or torch Adam on the fp32 partition", where),
    ]
    if w.offload:
        return [*terms, _term("gradients", "fp32 gradient partition", 4 * local,
                              "offload_optimizer: reduced gradients go straight into the fp32 partition's .grad "
                              "on the host", "host", pinned=True)]
    return [
        *terms,
        _term("gradients", "bf16 gradient partition", 2 * local,
              "stage3 grad_partitions_flat_buffer (one bf16 element per partitioned parameter)"),
        _term("gradients", "fp32 gradient of one sub-group during the step", 4 * min(w.sub_group_size, local),
              "stage3 upcasts one sub_group_size slice of the gradient partition at a time"),
    ]


def native_gqa(w: Workload) -> bool:
    """transformers 5 hands grouped key-value heads to SDPA as they are (enable_gqa) when there is no mask and
    head_dim <= 256 (integrations/sdpa_attention.use_gqa_in_sdpa); eager attention, and SDPA otherwise, repeat
    them to every head first (repeat_kv), and the attention then saves the repeated copies."""
    return w.attention == "sdpa" and w.shape.head_dim <= 256


def layer_saved_bytes(w: Workload, stack: Stack) -> tuple[int, str]:
    """Bytes one decoder layer's forward saves for its backward, and the formula, in Korthikanti et al.'s
    notation with Q = heads x head_dim (query and attention-output width), K = key-value heads x head_dim."""
    s = w.shape
    t, h, i, a, b, seq = w.tokens, s.hidden, s.intermediate, s.heads, w.micro_batch, w.seq_len
    q, kv = s.q_width, s.kv_width if native_gqa(w) else s.q_width
    # Per layer, bf16 unless noted. Each RMSNorm saves its fp32 input copy (4Th), its fp32 1/rms per token
    # (4T), the normalized bf16 tensor the weight multiplies (2Th) and the product the projections read
    # (2Th); then rotated q, k and v (2TQ + 4TK), the attention output made contiguous for o_proj (2TQ), and
    # the MLP's gate, SiLU, up and product (8TI). transformers 4.28's RMSNorm multiplies its bf16 *input*
    # by 1/rms, so it saves that input too: the residual sum before the second norm (2Th) and, without
    # checkpointing, the layer's input (2Th; with checkpointing that is the checkpoint itself).
    # tests/test_planner.py counts what transformers 5 saves, tensor by tensor, and finds exactly this.
    norms = s.norms_per_layer * (8 * t * h + 4 * t)
    attention = 4 * t * q + 4 * t * kv
    parts = [f"{s.norms_per_layer} x (8Th + 4T)", "4TQ + 4TK"]
    if s.qk_norm:
        # Qwen3's per-head RMSNorm of q and k: fp32 copy, 1/rms per head and token, normalized bf16.
        attention += 6 * t * (q + s.kv_width) + 4 * t * (a + s.kv_heads)
        parts.append("6T(Q + K) + 4T(a + k)")
    if s.moe:
        # Each token's hidden state, gathered for each of its experts, and that expert's SwiGLU (8TI per
        # token and expert), then the router's fp32 probabilities; tokens per expert do not matter, the sum does.
        k = s.experts_per_token
        mlp = k * (2 * t * h + 8 * t * i) + 4 * t * s.experts
        parts.append(f"{k} x (2Th + 8TI) + 4TE")
    else:
        mlp = 8 * t * i
        parts.append("8TI")
    saved = norms + attention + mlp
    if stack == "2023":
        saved += 2 * t * h + (0 if w.grad_ckpt else 2 * t * h)
        parts.append(f"{2 if w.grad_ckpt else 4}Th")
    if w.attention == "eager":
        # A soft-capped attention (cap x tanh(scores / cap)) keeps tanh's bf16 output too.
        score_bytes = _SCORE_BYTES_SAVED[stack] + (2 if s.attention_softcap else 0)
        saved += score_bytes * a * b * seq * seq
        parts.append(f"{score_bytes} bytes x a*b*s^2 scores")
    else:
        saved += 4 * a * t  # memory-efficient / flash attention keeps only the fp32 log-sum-exp
        parts.append("4aT (no s^2 term)")
    return saved, " + ".join(parts)


def activation_terms(w: Workload, stack: Stack) -> list[Term]:
    """What the forward saves for backward and what the backward allocates on top, per rank."""
    s = w.shape
    t, h, a, b, seq = w.tokens, s.hidden, s.heads, w.micro_batch, w.seq_len
    scores = a * b * seq * seq
    saved_layer, formula = layer_saved_bytes(w, stack)
    if w.attention == "eager":
        # In softmax's backward the bf16 probabilities are already freed (their matmul ran first) while the
        # fp32 gradients of softmax's output and input are both held: -2 + 4 + 4 bytes per score.
        transient, transient_source = 6 * scores, "eager softmax backward: two fp32 score gradients at once"
    else:
        kv = s.kv_width if native_gqa(w) else s.q_width
        transient, transient_source = 2 * t * (s.q_width + 2 * kv), "SDPA backward: gradients of q, k and v"
    layer_source = (f"per-layer saved tensors: {formula} (Korthikanti et al. 2022 eq. 1, redone for the "
                    "model's blocks and the stack's attention code)")
    terms = []
    if w.grad_ckpt:
        terms.append(_term("activations", "checkpointed layer inputs", 2 * t * h * s.layers,
                           "checkpointing keeps each layer's bf16 input, 2Th per layer (Korthikanti et al. "
                           "2022 section 5)"))
        terms.append(_term("activations", "one layer recomputed in backward", saved_layer, layer_source,
                           phase="layer"))
    else:
        terms.append(_term("activations", f"all {s.layers} layers' saved tensors", saved_layer * s.layers,
                           layer_source))
    terms.append(_term("activations", "backward transient", transient, transient_source, phase="layer"))
    # A soft-capped head (cap x tanh(logits / cap)) keeps tanh's bf16 output for its backward: 2 more bytes.
    loss_bytes = _LOSS_BYTES[stack] + (2 if s.logit_softcap else 0)
    terms.append(_term("logits and loss", "vocabulary-sized tensors of the loss", loss_bytes * t * s.vocab,
                       "bf16 logits, log-softmax and their gradients (transformers 4.28); fp32 after "
                       "transformers 5's logits.float()" + ("; the soft-cap's saved tanh, bf16" if s.logit_softcap
                                                            else ""), phase="loss"))
    return terms


def communication_terms(w: Workload, stack: Stack) -> list[Term]:
    """Unsharded units in flight (FSDP) or gathered parameters and buckets (ZeRO-3)."""
    s, n = w.shape, w.gpus
    if w.method == "zero3":
        reduce_bucket = w.reduce_bucket_size or s.hidden**2
        prefetch = w.prefetch_bucket_size or int(0.9 * s.hidden**2)
        largest = s.largest_module_params
        kept = max(0, min(w.max_live_parameters, s.params) - largest - prefetch)
        return [
            _term("communication and prefetch", "largest module gathered, with its gradient", 4 * largest,
                  "DeepSpeed estimate_zero3_model_states_mem_needs: largest_layer_memory = 4 x largest layer"),
            _term("communication and prefetch", "prefetch bucket", 2 * prefetch,
                  "stage3_prefetch_bucket_size ('auto': 0.9 hidden^2) bf16 parameters fetched ahead"),
            _term("communication and prefetch", "parameters kept gathered", 2 * kept,
                  "stage3_max_live_parameters / max_reuse_distance (1e9 in the seed's config): parameters "
                  "reused soon are not released"),
            _term("communication and prefetch", "gradient reduce bucket", 4 * reduce_bucket,
                  "reduce_bucket_size ('auto': hidden^2) bf16: the flat bucket and the .grads waiting for it",
                  phase="layer"),
        ]
    unit, root = s.layer_params, s.root_params
    terms = [
        _term("communication and prefetch", "root unit unsharded (embeddings, LM head, norm)", 2 * root,
              "the root FSDP unit is not resharded after forward (FSDP1 _post_forward; FSDP2 root "
              "reshard_after_forward=False), bf16"),
        _term("communication and prefetch", "two layer units unsharded (current + prefetched)", 2 * 2 * unit,
              "backward_prefetch BACKWARD_PRE (FSDP1 default) / FSDP2's implicit prefetch: one unit ahead"),
        _term("communication and prefetch", "unit gradient being reduce-scattered",
              (2 if stack == "2023" else 2 + 4) * unit,
              "bf16 unsharded gradient (2023: reduce_dtype bf16, HF's MixedPrecision); FSDP2 here reduces "
              "in fp32, an extra fp32 copy", phase="layer"),
    ]
    if stack == "today" and not w.offload:
        # The backward ends with the root unit: its parameters resharded, its bf16 gradients (embedding, LM head)
        # copied into the fp32 reduce-scatter input, while every layer's gradient shard is already there. A
        # large vocabulary makes this the step's peak (a trace of Llama-3.1-8B shows it).
        # The term is net of what is gone by then: the root's bf16 parameters, the layers' unsharded units and
        # the saved activations, all held throughout the other phases.
        layer_grads = 4 * (local_elements(w, stack) - -(-s.root_params // n)) if w.accumulation == 1 else 0
        gone = 2 * 2 * unit + sum(t.bytes for t in activation_terms(w, stack) if t.phase is None)
        reducing = (2 + 4) * root - 2 * root
        # A tied embedding gets two bf16 gradients, the LM head's and the lookup's, summed into a third while
        # the root's parameters are still unsharded and the first layer's fp32 reduce-scatter input is still
        # held (a trace of Gemma 2 shows the four embedding-sized tensors and that buffer at its peak).
        summing = 3 * 2 * s.embedding_params + 4 * unit if s.tied else 0
        terms.append(_term("communication and prefetch", "root unit's gradients being reduce-scattered",
                           max(reducing, summing) + layer_grads - gone,
                           "FSDP2 post-backward of the root: reshard (its 2 x root bf16 parameters freed), then "
                           "foreach_reduce copies the bf16 gradients (2 x root) into one fp32 buffer (4 x root); "
                           "with one micro-batch per step the layers' fp32 gradient shards are held too; net of "
                           "the layer units and saved activations freed by then; tied: the larger of that and "
                           "the sum of the embedding's two gradients (3 x 2 V h + the first layer's 4 x layer "
                           "reduce input)", phase="root"))
    if w.offload:
        terms.append(_term("communication and prefetch", "offloaded shards copied to the GPU", 2 * 6 * unit / n,
                           "each unsharded unit first copies its fp32 host shard to the GPU and casts it to bf16 "
                           "(FSDP1 _use_low_precision_shard: _local_shard.to(device) then _mp_shard)"))
    if stack == "2023":
        if w.accumulation > 1:
            terms.append(_term("gradients", "unsharded bf16 gradients accumulated under no_sync()", 2 * s.params,
                               "HF Trainer 4.28 wraps the non-final micro-batches in model.no_sync(); FSDP1 then "
                               "keeps each FlatParameter's unsharded .grad (_post_backward_hook returns before "
                               "the reduce-scatter; no_sync docstring: 'full model gradients')"))
        ahead = (s.layers - 2) * (2 * unit + (6 * unit / n if w.offload else 0))
        terms.append(_term("communication and prefetch", "all-gathers issued ahead (limit_all_gathers=False)", ahead,
                           "torch 2.0 FSDP and HF 4.28's fsdp_config default limit_all_gathers=False: the CPU "
                           "issues later units' all-gathers before the GPU frees earlier ones (the rate limiter, "
                           "default from torch 2.1, bounds this to two units)", kind="elastic"))
    return terms


def reserve_terms(w: Workload, stack: Stack) -> list[Term]:
    """What the CUDA caching allocator reserves beyond live tensors, from its per-stream pools.

    The allocator (c10/cuda/CUDACachingAllocator.cpp) returns a freed block to the pool of the stream that
    allocated it, and only that stream can reuse it (planner/allocator.py models the rules). FSDP2's
    foreach_all_gather allocates each unit's flat all-gather output and input inside
    ``device_handle.stream(all_gather_copy_in_stream)``; the copy-out then copies it into per-parameter
    tensors on the compute stream and frees it. So the copy-in stream's pool keeps, from the first step on,
    the most it ever held at once: at the forward's start, the root unit's output and input and the first
    layer's, prefetched: 2 (root + unit)(1 + 1/N) bytes in bf16. The live terms already count one layer
    unit's bf16 parameters for the prefetched unit; the rest is cached. (Its reduce_output, allocated on the
    reduce-scatter stream, becomes the sharded gradient: counted live, and reused there every step.)

    The 2023 stack's FSDP1 allocates its unsharded FlatParameters on its unshard stream: that pool's
    growth is the elastic "all-gathers issued ahead" term. DeepSpeed's all-gather stream is
    zero3_gathered_ahead_terms: it depends on rates, so the prediction adds it with its hardware.
    The compute stream's own fragmentation is not a term: the planner states it as its uncertainty
    (Prediction.reserve_uncertainty)."""
    if w.method != "fsdp" or stack != "today":
        return []
    s, n = w.shape, w.gpus
    unit, root = s.layer_params, s.root_params
    held = 2 * (root + unit) * (1 + 1 / n)
    return [_term("caching allocator", "all-gather copy-in stream's pool (cached)", held - 2 * unit,
                  "FSDP2 foreach_all_gather allocates flat all-gather outputs and inputs on "
                  "all_gather_copy_in_stream; CUDACachingAllocator keeps a pool per stream: the root's and the "
                  "first prefetched layer's, 2 (root + unit)(1 + 1/N) in bf16, less the prefetched unit counted "
                  "live", kind="reserve")]


def zero3_gathered_ahead_terms(w: Workload, lead) -> list[Term]:
    """Gathered parameters the CPU has freed but the caching allocator may not yet reuse, in ZeRO-3's forward.

    DeepSpeed (0.9.2 and 0.19 alike) gathers each module's parameters inside
    ``get_accelerator().stream(self.__allgather_stream)`` (partitioned_param_coordinator.__all_gather_params), so
    their blocks belong to that stream's pool, and frees them after the module's forward with
    ``param.data.record_stream(current_stream())`` (partition_parameters.free_param). The allocator returns a
    block with recorded streams to its pool only once events on those streams have completed
    (CUDACachingAllocator.cpp: insert_events, process_events): the gathered layers the compute stream has not
    reached yet stay held, and the pool keeps them cached afterwards. ``lead`` (time_model.zero3_forward_lead)
    says how many layers that is at the end of the forward, each 2 x layer bytes in bf16. Reserved, not
    allocated (free() has already taken them out of torch's allocated bytes), and not a cause of OOM: a failed
    allocation synchronizes those events and frees the blocks before it gives up (release_cached_blocks), as far
    as no live block splits their segments."""
    if lead is None or lead.layers <= 0:
        return []
    return [_term("caching allocator", f"gathered layers awaiting the compute stream ({lead.layers:.1f} of "
                  f"{w.shape.layers})", lead.layers * 2 * w.shape.layer_params,
                  f"DeepSpeed free_param's record_stream on gathers from its all-gather stream; the CPU leads the "
                  f"GPU by L (1 - fetch / forward) layers: a layer's fetch {lead.fetch_s * 1e3:.1f} ms, its "
                  f"forward {lead.forward_s * 1e3:.1f} ms", kind="reserve")]


def runtime_terms() -> list[Term]:
    return [_term("runtime", "CUDA context and kernels", CUDA_CONTEXT_BYTES,
                  "transformers docs, 'Model training anatomy': the kernels alone take 1.3 GB")]


def host_terms(w: Workload, stack: Stack) -> list[Term]:
    """Host memory beyond the offloaded model states (which model_state_terms already places on the host)."""
    if w.method == "fsdp" and stack == "2023":
        return [_term("host", "full fp32 model loaded by every rank before wrapping", 4 * w.shape.params,
                      "Alpaca's train.py calls from_pretrained on each rank in fp32 before the Trainer wraps it "
                      "in FSDP: one whole copy per rank, per GPU of the node", device="host", phase="load")]
    return []


def backward_walk_terms(w: Workload, stack: Stack) -> list[Term]:
    """What the layer phase's sum over-counts when every step starts without gradients (FSDP, one
    micro-batch per step): the backward frees each layer's saved tensors (its checkpoint, or everything it
    saved) as it makes that layer's gradient shard, so the two never peak together. With k layers still to go,
    k x saved + (L - k) x shard are held, largest at the first layer (L x saved) or at the last but one
    (saved + (L - 1) x shard, the root's shard not made yet); the terms count L x saved + the whole shard."""
    if w.method != "fsdp" or w.accumulation != 1:
        return []
    s, n = w.shape, w.gpus
    kept = [t.bytes for t in activation_terms(w, stack) if t.group == "activations" and t.phase is None]
    saved_all = sum(kept)
    saved = saved_all // s.layers
    shard_all = 4 * local_elements(w, stack)
    layer_shard = 4 * (local_elements(w, stack) - -(-s.root_params // n)) // s.layers
    held = max(saved_all, saved + (s.layers - 1) * layer_shard)
    return [_term("gradients", "saved tensors freed as gradient shards are made", held - saved_all - shard_all,
                  "the backward walks the layers from the last: k x saved + (L - k) x shard at most "
                  f"max(L x saved, saved + (L - 1) x shard) = {held / 2**30:.2f} GiB, not their sum (negative: "
                  "what the other terms count twice)", phase="layer")]


def terms(w: Workload, stack: Stack) -> list[Term]:
    return [*model_state_terms(w, stack), *activation_terms(w, stack), *backward_walk_terms(w, stack),
            *communication_terms(w, stack),
            *reserve_terms(w, stack), *runtime_terms(), *host_terms(w, stack)]


def peak(term_list: list[Term], device: str = "gpu", kinds: tuple[str, ...] = ("live",)) -> int:
    """Bytes held at the worst moment of a training step: everything held throughout plus the largest of the
    layer, loss and root phases (load-phase terms are the caller's: they come before the step)."""
    chosen = [t for t in term_list if t.device == device and t.kind in kinds]
    always = sum(t.bytes for t in chosen if t.phase is None)
    phases = [sum(t.bytes for t in chosen if t.phase == phase) for phase in ("layer", "loss", "root")]
    return always + max(phases)
