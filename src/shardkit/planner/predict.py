"""The planner's prediction: peak memory per GPU for a recipe or any configuration, and its verdict against
the card (docs/planner.md).

Verdicts follow how PyTorch's caching allocator behaves: it keeps what it once reserved, so a run's
reported peak (nvidia-smi, the table's instrument) grows towards the card; when an allocation does not fit
it frees its cached blocks and retries before it gives up. So only the ``live`` bytes decide OOM; the
``elastic`` bytes (all-gathers issued ahead) only fill memory that is free. A run whose live bytes fit but
whose live + elastic bytes exceed the card is "at capacity": it runs, reported at the card's size, slowed
by the allocator's retries."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from functools import cached_property
from itertools import product

from ..errors import UsageError
from ..spec.architecture import architecture_of, default_seq_len
from ..spec.parallelism import Parallelism
from ..spec.presets import resolve_name
from . import memory_model as mm
from . import time_model as tm
from .hardware import REFERENCE, Hardware

GIB = 2**30
# An "80GB" A100 or H100 has 80 GiB (81,920 MiB): GPU vendors and nvidia-smi count in binary units.
DEFAULT_GPU_MEMORY = 80 * GIB
_UNITS = {"": 2**30, "b": 1, "kb": 2**10, "kib": 2**10, "mb": 2**20, "mib": 2**20, "gb": 2**30, "gib": 2**30,
          "tb": 2**40, "tib": 2**40}


def parse_size(text: str, flag: str) -> int:
    """'80GB', '80GiB', '81920MiB', '512GB' -> bytes. GB is read as GiB, as GPU vendors and nvidia-smi mean it;
    a bare number is GiB too (nobody sizes a GPU in bytes; "80" is the 80 GB card), bytes need a B."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise UsageError(f"{flag} {text!r}: expected a size such as 80GB, 80GiB or 81920MiB")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"{flag} {text!r}: must be more than 0 bytes, and finite")
    return int(value)


def shape_of(model: str) -> mm.Architecture:
    """A preset, a catalogued hub id or a local folder's config.json, described (spec/architecture.py)."""
    name, hf_config, _ = resolve_name(model, "--model")
    return architecture_of(hf_config, name)


def seq_len_of(model: str) -> int:
    return default_seq_len(shape_of(model))


def check_gpus(gpus: int) -> None:
    if gpus < 1:
        raise UsageError(f"--gpus {gpus}: needs at least one GPU")


def workload(model: str, parallelism: Parallelism, gpus: int, micro_batch: int, grad_ckpt: bool,
             accumulation: int | None = None, attention: str = "eager", seq_len: int | None = None,
             beyond_context: bool = False, **run_length) -> mm.Workload:
    """``run_length``: examples, epochs, save_every (the seed's 6000, 3 and 100 when not given). Plans that
    cannot be are one-line errors: a sequence longer than the model's context (unless ``beyond_context``),
    more GPUs than sequences in a step or in the data set, a step larger than the data set."""
    check_gpus(gpus)
    if micro_batch < 1:
        raise UsageError(f"batch {micro_batch}: needs at least one sequence per GPU")
    shape = shape_of(model)
    if seq_len is not None and seq_len < 1:
        raise UsageError(f"--seq-len {seq_len}: needs at least one token")
    if seq_len and seq_len > shape.context and not beyond_context:
        raise UsageError(f"--seq-len {seq_len}: longer than {model}'s context of {shape.context} tokens "
                         "(max_position_embeddings); --beyond-context plans it anyway")
    w = mm.Workload(shape=shape, parallelism=parallelism, gpus=gpus, micro_batch=micro_batch,
                    seq_len=seq_len or default_seq_len(shape), grad_ckpt=grad_ckpt,
                    accumulation=accumulation or parallelism.seed_accumulation, attention=attention, **run_length)
    step = w.micro_batch * w.accumulation * gpus
    if gpus > w.examples:
        raise UsageError(f"--gpus {gpus}: more GPUs than the {w.examples} sequences of the data set; every GPU "
                         "needs at least one")
    if step > w.examples:
        raise UsageError(f"a global batch of {step} sequences ({gpus} GPUs x {w.micro_batch} x {w.accumulation} "
                         f"accumulation) is larger than the data set's {w.examples}")
    return w


def recipe_workload(recipe, gpus: int | None = None, allocator: str = "default") -> mm.Workload:
    """A recipe's workload, its sequence length as written: the engine runs it beyond the context too."""
    attention = "eager" if recipe.attn == "eager" else "sdpa"
    return workload(recipe.model, recipe.parallelism, recipe.gpus if gpus is None else gpus, recipe.batch,
                    recipe.grad_ckpt, recipe.accumulation, attention, recipe.seq_len, beyond_context=True,
                    examples=recipe.num_examples,
                    epochs=recipe.epochs, save_every=recipe.save_steps if recipe.save else None,
                    allocator=allocator)


@dataclass
class Prediction:
    name: str
    stack: str
    workload: mm.Workload
    gpu_memory: int
    host_memory: int | None
    terms: list[mm.Term] = field(default_factory=list)
    hardware: Hardware = REFERENCE
    """The node the time is predicted for; memory depends on it only through ZeRO-3's gathered layers awaiting
    the compute stream, a race between the host link and the GPU (memory_model.zero3_gathered_ahead_terms)."""
    lead: tm.ForwardLead | None = None
    """How far ZeRO-3's CPU runs ahead of the GPU in forward on ``hardware``; None where nothing is gathered."""

    @cached_property
    def time(self) -> tm.TimePrediction:
        return tm.predict_time(self.workload, self.stack, self.hardware)

    @property
    def live(self) -> int:
        """Bytes that must be held at once on the GPU, CUDA context included: more than the card is OOM."""
        return mm.peak(self.terms)

    @property
    def with_elastic(self) -> int:
        return mm.peak(self.terms, kinds=("live", "elastic"))

    @property
    def context(self) -> int:
        """The CUDA context and kernels: outside the caching allocator, seen by nvidia-smi."""
        return sum(t.bytes for t in self.terms if t.group == "runtime" and t.device == "gpu")

    @property
    def communicator(self) -> int:
        """NCCL's own buffers, outside the caching allocator. Not modelled (0): no sourced figure for the
        table's NCCL; a fake process group (--fake_world) has none."""
        return 0

    @property
    def allocated(self) -> int:
        """torch.cuda.max_memory_allocated: the live tensors' peak, without what lives outside the allocator."""
        return self.live - self.context - self.communicator

    @property
    def reserved(self) -> int:
        """torch.cuda.max_memory_reserved: allocated plus what the caching allocator keeps cached (its
        per-stream pools, ZeRO-3's gathered layers awaiting the compute stream, and the 2023 stack's
        all-gathers issued ahead)."""
        return mm.peak(self.terms, kinds=("live", "elastic", "reserve")) - self.context - self.communicator

    @property
    def nvidia_smi(self) -> int:
        """What nvidia-smi shows at the peak: reserved + CUDA context + communicator buffers."""
        return self.reserved + self.context + self.communicator

    @property
    def reserve_uncertainty(self) -> int:
        """What the planner does not model of the reserve: fragmentation of the compute stream's pool. When a
        request finds no cached block large enough (best fit, blocks split by longer-lived tensors such as
        checkpoints or the optimizer's states), the allocator reserves a new segment of the request's size;
        the requests that recur in every layer are the layer phase's transients, so the bound stated here is
        one more copy of them: the layer phase's live bytes (docs/planner.md: a bound argued, not proven).

        With expandable segments (torch's "CUDA semantics" notes: one segment per stream that grows by mapping
        2 MiB pages) a request no cached block can serve extends the segment instead of reserving a new one of
        its own size, so that fragmentation does not build up: no uncertainty beyond a page per stream. The
        per-stream pools (the reserve terms) remain: each stream still has its own segment."""
        if self.workload.allocator == "expandable":
            return 0
        return sum(t.bytes for t in self.terms if t.device == "gpu" and t.kind == "live" and t.phase == "layer")

    @property
    def verdict(self) -> str:
        """oom when live bytes exceed the card; "at capacity" when what nvidia-smi would show comes within the
        reserve's uncertainty of the card (the allocator may fill it and retry); else fits."""
        if self.live > self.gpu_memory:
            return "oom"
        return "at capacity" if self.nvidia_smi + self.reserve_uncertainty > self.gpu_memory else "fits"

    @property
    def reported(self) -> int | None:
        """What nvidia-smi would show at the peak, at most the card: None when the run does not fit."""
        return None if self.verdict == "oom" else min(self.nvidia_smi, self.gpu_memory)

    @property
    def optimizer(self) -> str:
        """Which AdamW the prediction assumes, and so whether the step makes temporaries."""
        w = self.workload
        if w.method == "zero3":
            return "DeepSpeed's AdamW on the fp32 partition (DeepSpeedCPUAdam with offload)"
        if self.stack == "2023":
            return "HF Trainer 4.28 adamw_hf (its own AdamW, a loop over parameters)"
        if w.offload:
            return "torch AdamW foreach on the host (offloaded states)"
        return ("torch AdamW fused, shardkit's on CUDA: no step temporaries (the default foreach AdamW would "
                "add 4 bytes x local parameters during the step)")

    @property
    def margin(self) -> int:
        """Card minus live bytes: negative is by how much it does not fit."""
        return self.gpu_memory - self.live

    @property
    def host(self) -> int:
        """Host memory on the node at its peak, loading or training: every rank's (all ranks on one node, as in
        the table). The optimizer's states exist only once training starts, after the load."""
        training = mm.peak([t for t in self.terms if t.phase != "load"], device="host")
        loading = sum(t.bytes for t in self.terms if t.device == "host" and t.phase == "load")
        return max(training, loading) * self.workload.gpus

    @property
    def host_pinned(self) -> int:
        return sum(t.bytes for t in self.terms if t.pinned) * self.workload.gpus

    @property
    def host_verdict(self) -> str | None:
        if self.host_memory is None:
            return None
        return "fits" if self.host <= self.host_memory else "oom"

    @property
    def rejected(self) -> str | None:
        """Why this configuration cannot run here (OOM on the GPU, or on the host given --host-mem), or None."""
        if self.verdict == "oom":
            return f"OOM on GPU: live {self.live / GIB:.1f} GiB > {self.gpu_memory / GIB:.0f} GiB"
        if self.host_verdict == "oom":
            return f"OOM on host: {self.host / GIB:.0f} GiB > --host-mem {self.host_memory / GIB:.0f} GiB"
        return None

    def activation_variants(self) -> dict[str, int]:
        """Peak activation + loss bytes of this run with and without checkpointing, eager and memory-efficient
        (SDPA) attention, everything else unchanged: what each choice would cost."""
        out = {}
        for ckpt, attention in product((True, False), ("eager", "sdpa")):
            w = replace(self.workload, grad_ckpt=ckpt, attention=attention)
            label = f"{'checkpointing' if ckpt else 'no checkpointing'}, {attention}"
            out[label] = mm.peak(mm.activation_terms(w, self.stack))
        return out

    def summary(self) -> str:
        w = self.workload
        label = (f"{w.parallelism.label}, {'' if w.grad_ckpt else 'no '}checkpointing, "
                 f"batch {w.micro_batch} x {w.accumulation} accumulation, {w.gpus} GPUs, {w.attention} attention")
        if self.verdict == "oom":
            verdict = f"OOM by {-self.margin / GIB:.1f} GiB"
        elif self.verdict == "at capacity":
            verdict = (f"fits at capacity: nvidia-smi {self.nvidia_smi / GIB:.1f} GiB within the reserve's "
                       f"uncertainty ({self.reserve_uncertainty / GIB:.1f} GiB) of the card, the caching allocator "
                       f"may fill it (live {self.live / GIB:.1f} GiB, margin {self.margin / GIB:.1f} GiB)")
        else:
            verdict = (f"fits, margin {self.margin / GIB:.1f} GiB (nvidia-smi {self.nvidia_smi / GIB:.1f} GiB, "
                       f"uncertainty {self.reserve_uncertainty / GIB:.1f} GiB)")
        host = f"; host {self.host / GIB:.0f} GiB ({self.host_pinned / GIB:.0f} pinned)" if self.host else ""
        if self.host_verdict == "oom":
            host += f" > --host-mem {self.host_memory / GIB:.0f} GiB: host OOM"
        return f"{label}: {verdict} on {self.gpu_memory / GIB:.0f} GiB{host}"

    def to_dict(self) -> dict:
        w = self.workload
        return {
            "name": self.name, "stack": self.stack, "stack_description": mm.STACKS[self.stack],
            "workload": {**w.shape.describe(), "parameters": w.shape.params,
                         "method": w.parallelism.name, "kind": w.method, "offload": w.offload, "gpus": w.gpus, "micro_batch": w.micro_batch,
                         "seq_len": w.seq_len, "grad_ckpt": w.grad_ckpt, "accumulation": w.accumulation,
                         "attention": w.attention, "allocator": w.allocator},
            "gpu_memory_bytes": self.gpu_memory, "gpu_live_bytes": self.live,
            "gpu_with_elastic_bytes": self.with_elastic, "gpu_reported_bytes": self.reported,
            "gpu_allocated_bytes": self.allocated, "gpu_reserved_bytes": self.reserved,
            "gpu_nvidia_smi_bytes": self.nvidia_smi, "gpu_context_bytes": self.context,
            "gpu_communicator_bytes": self.communicator, "gpu_reserve_uncertainty_bytes": self.reserve_uncertainty,
            "optimizer": self.optimizer,
            "verdict": self.verdict, "margin_bytes": self.margin,
            "host_bytes": self.host, "host_pinned_bytes": self.host_pinned, "host_memory_bytes": self.host_memory,
            "host_verdict": self.host_verdict,
            "terms": [t.to_dict() for t in self.terms],
            "activation_variants_bytes": self.activation_variants(),
            "time": self.time.to_dict(),
        }


def predict(w: mm.Workload, stack: str = "today", gpu_memory: int = DEFAULT_GPU_MEMORY,
            host_memory: int | None = None, name: str = "", hardware: Hardware = REFERENCE) -> Prediction:
    if stack not in mm.STACKS:
        raise UsageError(f"--stack {stack!r}: one of {', '.join(mm.STACKS)}")
    lead = tm.zero3_forward_lead(w, stack, hardware)
    terms = [*mm.terms(w, stack), *mm.zero3_gathered_ahead_terms(w, lead)]
    return Prediction(name, stack, w, gpu_memory, host_memory, terms, hardware, lead)


def predict_recipe(recipe, stack: str = "today", gpu_memory: int = DEFAULT_GPU_MEMORY,
                   host_memory: int | None = None, gpus: int | None = None,
                   hardware: Hardware = REFERENCE, allocator: str = "default") -> Prediction:
    return predict(recipe_workload(recipe, gpus, allocator), stack, gpu_memory, host_memory, recipe.name, hardware)
