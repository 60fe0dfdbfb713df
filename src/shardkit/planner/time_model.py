"""Time per optimizer step and per run, term by term, for FSDP and ZeRO-3 on LLaMA shapes.

Like the memory model: arithmetic on the shape and the settings, no torch import. Each term is an amount of
work (FLOPs or bytes) over the rate of the one resource that does it (hardware.py), with the source of the
count. No term carries a factor fitted to the table's times.

How terms combine in a step. The GPU's kernels, the collectives (their own stream and NVLink) and the host
copies (copy engines, each PCIe direction) run side by side, so the terms that overlap are summed per
resource ("lane") and the slowest lane sets the pace; terms that nothing can hide (the first all-gather of a
forward, the last reduce-scatter of a backward, a blocking copy, the optimizer step, on GPU or CPU) add to
it. A run is its optimizer steps, its checkpoint saves and its start-up. docs/planner.md shows the terms and
the calibration against the table's 21 time cells.

Notation as in memory_model: P parameters, N GPUs, A micro-batches per step (accumulation), b micro-batch,
s sequence, h hidden, I intermediate, a heads, L layers, V vocabulary; "local" = P / N elements a rank owns.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

from ..results import metrics
from .hardware import Hardware
from .memory_model import Stack, Workload, local_elements

GROUPS = ("compute", "communication", "offload traffic", "CPU optimizer")
Lane = Literal["gpu", "link", "host to GPU", "GPU to host", "exposed"]

# Bytes each eager-attention score element (a*b*s*s of them per layer) costs in memory traffic, forward and
# backward, counted kernel by kernel (one read or write of a bf16 element is 2 bytes, fp32 4).
# transformers 4.28 LlamaAttention: QK^T writes 2; "/ sqrt(d)" 2+2; "+ mask" 2+2; torch.max clamp 2+2;
# softmax(dtype=float32) first converts (2+4) then softmaxes (4+4); .to(bf16) 4+2; the PV matmul reads 2:
# 36. Backward: dP written 2 and P read for dV 2; .to(bf16)'s backward 2+4; softmax's 4+4+4; the conversion's
# 4+2; the clamp's (gradient and saved input) 2+2+2; the division's 2+2; dS read by the dQ and dK matmuls 2+2:
# 42. transformers 5 eager_attention_forward has no clamp and multiplies by the scale: 32 and 36.
# SDPA's memory-efficient and flash kernels keep the scores on chip: none.
SCORE_BYTES: dict[str, tuple[int, int]] = {"2023": (36, 42), "today": (32, 36)}
# Optimizer bytes moved per parameter a rank owns, one step. transformers 4.28's default AdamW ("adamw_hf",
# transformers.optimization.AdamW) runs seven unfused fp32 ops: exp_avg mul_ 8, add_ 12; exp_avg_sq mul_ 8,
# addcmul_ 12; sqrt 8; add_(eps) 8; addcdiv_ 16 = 72; torch's foreach AdamW (the kit's, with CPU offload) the
# same 72; FSDP's clip_grad_norm_ reads the gradient for the norm and scales it: 4 + 8. A fused AdamW reads
# parameter, gradient and both moments and writes three: 28. DeepSpeed ZeRO-3 (stage3.py step): the
# gradient scaled in place (unscale_and_clip_grads) 8, Adam 28 (DeepSpeedCPUAdam, or FusedAdam on the GPU),
# the fp32 partition copied to the bf16 one (_reassign_or_swap_out_partitioned_parameters) 4+2: 42.
ADAMW_UNFUSED, ADAMW_FUSED, CLIP, ZERO3_STEP = 72, 28, 12, 42


def elementwise_bytes_per_token_layer(w: Workload) -> int:
    """Forward memory traffic per token per decoder layer of the kernels that are not matmuls (bf16 unless
    noted), read off transformers' LlamaDecoderLayer: each RMSNorm (to fp32 2+4, pow 4+4, mean 4, scale
    2+4 into fp32, back to bf16 4+2, times the weight 2+2) 34h, twice; rotary embedding of q and k (q*cos
    2+2, rotate_half's negation 1+1 and concatenation 2+2, *sin 2+2, the sum 4+2) 20h each; the attention
    output made contiguous 2+2 = 4h; two residual sums 6h each; SwiGLU's SiLU 2+2 and product 4+2 over I:
    124h + 10I. Its backward reads each gradient and saved input and writes a gradient per input: taken as
    twice the forward."""
    return 124 * w.shape.hidden + 10 * w.shape.intermediate


@dataclass(frozen=True)
class TimeTerm:
    """One item of work in a step: ``amount`` (FLOPs or bytes) at ``rate`` per second on ``resource``."""

    group: str
    name: str
    amount: float
    unit: Literal["FLOP", "B"]
    rate: float
    resource: str
    lane: Lane
    source: str

    @property
    def seconds(self) -> float:
        return self.amount / self.rate if self.amount else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "seconds": self.seconds}


def gathers_per_micro_batch(w: Workload, stack: Stack) -> int:
    """How often every parameter is all-gathered (FSDP unsharded, ZeRO-3 fetched) per micro-batch.

    Forward and backward: 2. HF 4.28 checkpoints with torch.utils.checkpoint's reentrant form around each
    FSDP1 unit: the recomputation runs the unit's forward again inside backward, whose post-forward hook
    reshards it (FULL_SHARD, not the root), and its pre-backward hook gathers it once more: 3 (torch 2.0
    _runtime_utils _post_forward_reshard, _pre_backward_hook). FSDP2 gathers before the layer's backward and
    the recomputation finds it gathered; ZeRO-3 keeps the recomputed layer's parameters for its backward
    (stage3_max_reuse_distance 1e9 in the seed's config)."""
    return 3 if w.method == "fsdp" and stack == "2023" and w.grad_ckpt else 2


def optimizer_steps(w: Workload) -> int:
    """Optimizer steps in the run: ceil(epochs x (examples // N // b // A)), as spec/resolve.py and HF
    Trainer count them."""
    return math.ceil(w.epochs * (w.examples // w.gpus // w.micro_batch // w.accumulation))


def cpu_threads(w: Workload, hw: Hardware) -> int:
    """Threads of a rank's CPU ops: torchrun (the seed's launcher) and shardkit's launcher set OMP_NUM_THREADS=1
    when a node runs several ranks (torch.distributed.run); one rank keeps every core."""
    return 1 if w.gpus > 1 else hw.host.cores


def compute_terms(w: Workload, stack: Stack, hw: Hardware) -> list[TimeTerm]:
    """The GPU's own work in a step: matmuls at the achievable matmul rate, memory-bound kernels at HBM
    bandwidth, and (without offload) the optimizer."""
    s, A = w.shape, w.accumulation
    tokens = w.tokens * A
    flops = metrics.hardware_flops_per_token(s.active_matmul_params, s.layers, s.hidden, w.seq_len, w.grad_ckpt) * tokens
    passes = 2 if w.grad_ckpt else 1  # forward passes per micro-batch: the recomputation is a second one
    hbm = hw.card.hbm_bytes_per_s
    terms = [TimeTerm("compute", "matmuls (model FLOPs + recomputation)", flops, "FLOP", hw.matmul_flops,
                      "GPU matmul", "gpu", "6N + 12LHS per token (PaLM, Appendix B), plus 2N + 4LHS when each layer "
                      f"is recomputed (Korthikanti et al. 2022); rate: {hw.matmul_source}")]
    if w.attention == "eager":
        forward, backward = SCORE_BYTES[stack]
        scores = w.shape.heads * w.micro_batch * w.seq_len**2 * s.layers * A
        terms.append(TimeTerm("compute", "eager attention's score tensors", (passes * forward + backward) * scores, "B",
                              hbm, "HBM", "gpu", f"{forward} bytes per score forward, {backward} backward, kernel by "
                              f"kernel ({'transformers 4.28' if stack == '2023' else 'transformers 5'} eager attention)"))
    elementwise = elementwise_bytes_per_token_layer(w) * (passes + 2) * tokens * s.layers
    terms.append(TimeTerm("compute", "norms, rotary, SwiGLU, residuals", elementwise, "B", hbm, "HBM", "gpu",
                          "124h + 10I bytes per token per layer forward, twice that backward"))
    if w.method == "fsdp" and stack == "2023" and A > 1:
        terms.append(TimeTerm("compute", "gradients accumulated unsharded under no_sync()", 6 * s.params * (A - 1),
                              "B", hbm, "HBM", "gpu", "HF 4.28's no_sync(): each later micro-batch adds its bf16 "
                              "gradients into the unsharded ones (read 2 + 2, write 2 per parameter)"))
    if not w.offload:
        per_param, source = optimizer_bytes(w, stack)
        terms.append(TimeTerm("compute", "optimizer step on the GPU", per_param * local_elements(w, stack), "B", hbm,
                              "HBM", "exposed", source))
    return terms


def optimizer_bytes(w: Workload, stack: Stack) -> tuple[int, str]:
    """Bytes per owned parameter of one optimizer step, with clipping (HF's max_grad_norm 1.0)."""
    if w.method == "zero3":
        return ZERO3_STEP, "DeepSpeed stage3 step: scale gradients 8, Adam 28, fp32 to bf16 copy 6"
    if stack == "2023" or w.offload:
        optimizer = "transformers 4.28 AdamW (adamw_hf)" if stack == "2023" else "torch foreach AdamW"
        return ADAMW_UNFUSED + CLIP, f"{optimizer}, seven unfused passes 72, FSDP clip_grad_norm_ 12"
    return ADAMW_FUSED + CLIP, "fused AdamW 28, clip_grad_norm_ 12"


def communication_terms(w: Workload, stack: Stack, hw: Hardware) -> list[TimeTerm]:
    """Collectives over the GPU link: bytes each GPU sends (= receives) in ring all-gathers and
    reduce-scatters, (N-1)/N of the gathered size (nccl-tests PERFORMANCE.md: bus bandwidth of both)."""
    n, s, A = w.gpus, w.shape, w.accumulation
    if n == 1:
        return []
    ring = (n - 1) / n
    link = hw.collective_bytes_per_s
    resource = "NVLink" if hw.link == "nvlink" else "PCIe (peer to peer)"
    gathers = gathers_per_micro_batch(w, stack)
    if w.method == "zero3":
        reduces, reduce_bytes = A, 2
        reduce_source = "ZeRO-3 reduce-scatters bf16 gradients (reduce_bucket_size) after every micro-batch"
        first = s.embedding_params  # the first module fetched in forward and the last reduced in backward
    elif stack == "2023":
        reduces, reduce_bytes = 1, 2
        reduce_source = ("HF 4.28 runs the first A-1 micro-batches under no_sync(): FSDP1 reduce-scatters once "
                         "per step, in bf16 (HF's MixedPrecision reduce_dtype)")
        first = s.root_params  # the root unit
    else:
        reduces, reduce_bytes = A, 4
        reduce_source = "FSDP2 as shardkit runs it reduce-scatters every micro-batch, in fp32"
        first = s.root_params
    return [
        TimeTerm("communication", f"parameter all-gathers ({gathers} per micro-batch)", A * gathers * 2 * s.params * ring,
                 "B", link, resource, "link", f"bf16 parameters gathered {gathers} times per micro-batch "
                 f"({'FSDP' if w.method == 'fsdp' else 'ZeRO-3'}; gathers_per_micro_batch)"),
        TimeTerm("communication", "gradient reduce-scatters", reduces * reduce_bytes * s.params * ring, "B", link,
                 resource, "link", reduce_source),
        TimeTerm("communication", "first all-gather of each forward, last reduce-scatter of the step",
                 (A * 2 + reduce_bytes) * first * ring, "B", link, resource, "exposed",
                 "nothing runs before the first unit's parameters arrive or after the last gradients leave"),
    ]


def offload_terms(w: Workload, stack: Stack, hw: Hardware) -> list[TimeTerm]:
    """Host-device copies over PCIe (both directions at once) and the optimizer on the CPU."""
    if not w.offload:
        return []
    local, A = local_elements(w, stack), w.accumulation
    pcie = hw.host_link_bytes_per_s(w.gpus)
    shared = f"PCIe per direction / {min(w.gpus, hw.host.gpus_per_pcie_uplink)} GPUs on one switch uplink"
    threads = cpu_threads(w, hw)
    host = hw.host_thread_bytes_per_s(threads)
    host_source = (f"{threads} thread(s) per rank: their cores' share of the host's memory bandwidth "
                   f"({hw.host.name})")
    if w.method == "fsdp":
        gathers = gathers_per_micro_batch(w, stack)
        grads = 1 if stack == "2023" else A
        per_param, optimizer_source = optimizer_bytes(w, stack)
        terms = [
            TimeTerm("offload traffic", "fp32 parameter shards copied to the GPU", A * gathers * 4 * local, "B", pcie,
                     "PCIe", "host to GPU", "every unshard copies the unit's fp32 host shard to the GPU and casts it "
                     f"(FSDP1 _use_low_precision_shard; FSDP2 CPUOffloadPolicy); {shared}"),
            TimeTerm("offload traffic", "fp32 gradient shards copied to the host", grads * 4 * local, "B", pcie,
                     "PCIe", "GPU to host", f"after each reduce-scatter ({grads} per step); {shared}"),
            TimeTerm("CPU optimizer", "clipping and AdamW on the host", per_param * local, "B", host,
                     "host memory", "exposed", f"{optimizer_source}; {host_source}"),
        ]
        if stack == "today" and A > 1:
            terms.append(TimeTerm("CPU optimizer", "gradients accumulated on the host", (A - 1) * 12 * local, "B",
                                  host, "host memory", "exposed", "FSDP2 adds each micro-batch's offloaded "
                                  f"gradient into the host's fp32 gradient (read 4 + 4, write 4); {host_source}"))
        return terms
    return [
        TimeTerm("offload traffic", "bf16 parameter partitions fetched to the GPU", A * 2 * 2 * local, "B", pcie,
                 "PCIe", "host to GPU", f"offload_param: each fetch copies the rank's bf16 partition to the GPU "
                 f"before the all-gather, twice per micro-batch; {shared}"),
        TimeTerm("offload traffic", "bf16 gradient partitions through the host buffer", 2 * A * local, "B", pcie,
                 "PCIe", "host to GPU", "stage3 __partition_grads: the pinned host buffer is brought back to the GPU "
                 "every micro-batch (.to(device) to accumulate)"),
        TimeTerm("offload traffic", "bf16 gradient partitions into the pinned host buffer", 2 * A * local, "B", pcie,
                 "PCIe", "GPU to host", "stage3 __partition_grads: grad_buffer.copy_ every micro-batch"),
        TimeTerm("offload traffic", "fp32 gradients copied at the accumulation boundary", 4 * local, "B", pcie,
                 "PCIe", "exposed", "stage3 __partition_grads: fp32_grad_tensor.copy_(grad_buffer) without "
                 "non_blocking: the host waits for each copy"),
        TimeTerm("CPU optimizer", "gradient scaling, CPU Adam, bf16 copy on the host", ZERO3_STEP * local, "B", host,
                 "host memory", "exposed", f"DeepSpeed stage3 step on the host: scale 8, DeepSpeedCPUAdam 28, fp32 to "
                 f"bf16 6 bytes per parameter; {host_source}"),
    ]


def layer_forward_seconds(w: Workload, stack: Stack, hw: Hardware) -> float:
    """GPU time of one decoder layer's forward over one micro-batch, priced as compute_terms prices the
    whole step: its matmuls (2 x the layer's projection parameters + 4 h s FLOPs per token, the forward third of
    PaLM's 6N + 12LHS), eager attention's score tensors (SCORE_BYTES, forward) and the elementwise kernels."""
    s = w.shape
    tokens = w.micro_batch * w.seq_len
    flops = (2 * (s.active_matmul_params - s.embedding_params) // s.layers + 4 * s.hidden * w.seq_len) * tokens
    memory = elementwise_bytes_per_token_layer(w) * tokens
    if w.attention == "eager":
        memory += SCORE_BYTES[stack][0] * s.heads * w.micro_batch * w.seq_len**2
    return flops / hw.matmul_flops + memory / hw.card.hbm_bytes_per_s


def layer_fetch_seconds(w: Workload, hw: Hardware) -> float:
    """How long ZeRO-3's fetch of one layer's parameters holds the CPU in forward. With offload_param each
    module's partition is copied from pinned host memory with a blocking ``ds_tensor.to(device)`` (one GPU:
    NoGatherHandle.wait synchronizes the all-gather stream), 2 x layer / N bytes over the GPU's share of PCIe;
    with N > 1 the all-gather follows on the same stream, and the coordinator waits once more than two fetches
    are in flight (partitioned_param_coordinator: __max_ongoing_fetch_events = 2), so the CPU also waits for the
    ring's 2 x layer x (N-1)/N bytes over the link. DeepSpeed 0.9.2 and 0.19 alike."""
    s, n = w.shape, w.gpus
    seconds = 2 * s.layer_params / n / hw.host_link_bytes_per_s(n) if w.offload else 0.0
    if n > 1:
        seconds += 2 * s.layer_params * (n - 1) / n / hw.collective_bytes_per_s
    return seconds


@dataclass(frozen=True)
class ForwardLead:
    """How many decoder layers ZeRO-3's CPU thread runs ahead of the GPU's compute stream by the end of a
    forward, and the two rates that set it."""

    layers: float
    forward_s: float
    fetch_s: float


def zero3_forward_lead(w: Workload, stack: Stack, hw: Hardware) -> ForwardLead | None:
    """Nothing in ZeRO-3's forward makes the CPU wait for the compute stream: it waits only for each fetch
    (layer_fetch_seconds). When a layer's fetch takes less than its forward on the GPU, the CPU issues the
    forward's L layers in L x fetch while the GPU finishes L x fetch / forward of them: by the end it is
    L (1 - fetch / forward) layers ahead, at most L - 1; when the fetch takes longer, the GPU waits for the
    parameters and the CPU is not ahead. None where nothing is gathered (one GPU, parameters on it). Assumes
    overlap_comm (the seed's config, and DeepSpeed's default for ZeRO-3): without it the fetches run on the
    compute stream and no gathered block waits for it."""
    if w.method != "zero3" or (w.gpus == 1 and not w.offload):
        return None
    forward, fetch = layer_forward_seconds(w, stack, hw), layer_fetch_seconds(w, hw)
    layers = w.shape.layers
    return ForwardLead(min(layers - 1, max(0.0, layers * (1 - fetch / forward))), forward, fetch)


def step_terms(w: Workload, stack: Stack, hw: Hardware) -> list[TimeTerm]:
    return [*compute_terms(w, stack, hw), *communication_terms(w, stack, hw), *offload_terms(w, stack, hw)]


def step_seconds(terms: list[TimeTerm]) -> float:
    """The slowest lane of the overlapping terms plus every exposed term."""
    lanes: dict[str, float] = {}
    for t in terms:
        lanes[t.lane] = lanes.get(t.lane, 0.0) + t.seconds
    exposed = lanes.pop("exposed", 0.0)
    return max(lanes.values(), default=0.0) + exposed


def save_bytes(w: Workload, stack: Stack) -> float:
    """Bytes the busiest writer (rank 0) serializes per checkpoint. HF 4.28 with FSDP saves the full fp32 state
    dict and rank 0's optimizer shard (Trainer._save_checkpoint); with ZeRO-3 the gathered 16-bit model
    (stage3_gather_16bit_weights_on_model_save) and every rank its fp32 master and Adam partition
    (save_checkpoint). shardkit writes each rank's shards (DCP, or DeepSpeed's save_checkpoint)."""
    local = local_elements(w, stack)
    if stack == "today":
        return 12 * local
    return (4 * w.shape.params + 8 * local) if w.method == "fsdp" else (2 * w.shape.params + 12 * local)


def startup_bytes(w: Workload, stack: Stack) -> float:
    """Bytes each rank loads before the first step. Alpaca's train.py (2023) reads the fp16 checkpoint (2P) on
    every rank and, for FSDP, keeps a fp32 copy (4P) before wrapping; shardkit initializes only its rank's fp32
    shard (4 x local)."""
    if stack == "2023":
        return 2 * w.shape.params + (4 * w.shape.params if w.method == "fsdp" else 0)
    return 4 * local_elements(w, stack)


@dataclass
class TimePrediction:
    """Predicted step and run time of one configuration on ``hardware``."""

    stack: str
    hardware: Hardware
    steps: int
    terms: list[TimeTerm] = field(default_factory=list)
    saves: int = 0
    save_seconds: float = 0.0
    startup_seconds: float = 0.0

    @property
    def step_seconds(self) -> float:
        return step_seconds(self.terms)

    @property
    def run_seconds(self) -> float:
        return self.steps * self.step_seconds + self.saves * self.save_seconds + self.startup_seconds

    def group_seconds(self) -> dict[str, float]:
        out = dict.fromkeys(GROUPS, 0.0)
        for t in self.terms:
            out[t.group] += t.seconds
        return out

    @property
    def dominant(self) -> str:
        """The group that takes longest per step: the one to change to make the run faster."""
        groups = self.group_seconds()
        return max(groups, key=groups.__getitem__)

    def to_dict(self) -> dict:
        hw = self.hardware
        return {"card": hw.card.name, "host": hw.host.name, "link": hw.link, "matmul_flops": hw.matmul_flops,
                "steps": self.steps, "step_seconds": self.step_seconds, "run_seconds": self.run_seconds,
                "dominant": self.dominant, "group_seconds": self.group_seconds(), "saves": self.saves,
                "save_seconds": self.save_seconds, "startup_seconds": self.startup_seconds,
                "terms": [t.to_dict() for t in self.terms]}


def predict_time(w: Workload, stack: Stack, hw: Hardware) -> TimePrediction:
    threads = hw.host_thread_bytes_per_s(cpu_threads(w, hw))
    saves = optimizer_steps(w) // w.save_every if w.save_every else 0
    return TimePrediction(stack, hw, optimizer_steps(w), step_terms(w, stack, hw), saves,
                          save_bytes(w, stack) / threads, startup_bytes(w, stack) / threads)


def clock(seconds: float) -> str:
    """Seconds as the table prints time: h:mm:ss."""
    whole = round(seconds)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"
