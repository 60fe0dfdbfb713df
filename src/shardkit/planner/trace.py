"""The planner's trace mode (``shardkit plan ... --trace``): one rank of an N-rank FSDP job run for real, at
full size, without allocating it, and its allocations replayed through the caching-allocator model.

The real transformers model is built on the meta device, sharded by the engine's own code (FSDP2's
``engine.fsdp.parallelize`` on today's stack, FSDP1's ``engine.fsdp1.wrap_2023`` for the 2023 stack) over a
fake process group (any world size, rank 0, collectives that do nothing), materialized inside FakeTensorMode
(shapes and dtypes, no storage), and two training steps are run with the engine's loss and AdamW. A dispatch
mode notes every new storage, every storage resize (FSDP2 allocates and frees unsharded parameters with
``resize_``) and every storage's death, with the stream the engine entered with ``device_handle.stream(...)``
(torch.cpu.stream here, patched to remember it): the caching allocator keeps a pool per stream. Replayed
through planner/allocator.py, the events give the allocated and reserved peaks a GPU would report.

What it leaves out: kernels' workspaces (cuBLAS, flash attention) and CUDA-only allocations, which a CPU run
does not make; the communicator's buffers (no NCCL); the optimizer's temporaries (DTensor runs AdamW's
for-loop below the dispatch mode, like the fused CUDA kernel, which makes none). ZeRO-3 cannot run on a fake
process group (DeepSpeed's partitioning talks to its peers while the model is built): there the analytic
figures stand."""

from __future__ import annotations

import contextlib
import functools
import gc
import resource
import time
import weakref
from dataclasses import dataclass

from ..errors import UsageError

DEFAULT = "default"


def _recorder():
    """A dispatch mode that records allocations (made here so that importing this module needs no torch)."""
    import torch
    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.events: list[tuple] = []
            self.streams: list = [DEFAULT]
            self._sizes: dict[int, int] = {}
            self._next = 0

        def _key(self, storage) -> int | None:
            return getattr(storage, "_shardkit_key", None)

        def note(self, storage) -> None:
            if self._key(storage) is not None or storage.nbytes() == 0:
                return
            key = self._next
            self._next += 1
            storage._shardkit_key = key
            self.events.append(("alloc", key, storage.nbytes(), self.streams[-1]))
            self._sizes[key] = storage.nbytes()
            weakref.finalize(storage, self.events.append, ("free", key))

        def mark(self, name: str) -> None:
            self.events.append(("mark", name))

        def resize(self, storage, size: int) -> None:
            key = self._key(storage)
            if key is not None and self._sizes.get(key):
                self.events.append(("free", key))
            if size:
                new = self._next
                self._next += 1
                storage._shardkit_key = new
                self._sizes[new] = size
                self.events.append(("alloc", new, size, self.streams[-1]))
                # the storage's death frees whatever it holds then
                weakref.finalize(storage, self.events.append, ("free", new))
            else:
                storage._shardkit_key = None

        def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            # An in-place op returns its input: it allocates nothing. Meta tensors are DTensor's shape
            # inference on global shapes (cached by its sharding propagator), not memory.
            if func._schema.name.endswith("_") or (kwargs or {}).get("out") is not None:
                return out
            for t in torch.utils._pytree.tree_leaves(out):
                # A DTensor is a wrapper: its local tensor, which this mode also sees, holds the memory.
                if isinstance(t, torch.Tensor) and t.device.type != "meta" and not isinstance(t, DTensor):
                    self.note(t.untyped_storage())
            return out

    return _Recorder()


@dataclass(frozen=True)
class Trace:
    allocated: int
    reserved: int
    seconds: float
    host_peak_bytes: int
    """The tracing process's peak resident memory (ru_maxrss), what a user's machine needs for it."""
    events: int


def _fake_world(world: int) -> None:
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        if dist.get_world_size() == world:
            return
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)


def fake_rank_model(spec, world: int, attention: str = "sdpa", grad_ckpt: bool = True):
    """Rank 0 of ``world`` ranks of the model as the native engine shards it (FSDP2: checkpointing, one unit
    per decoder layer, bf16 parameters with fp32 reduce), on the meta device over a fake process group; the
    caller materializes it (``to_empty``) inside FakeTensorMode."""
    import types

    import torch

    from ..engine import fsdp
    from ..engine.models import build_model

    _fake_world(world)
    cfg = types.SimpleNamespace(gradient_checkpointing=grad_ckpt, bf16=True)
    return fsdp.parallelize(build_model(spec, attention, 0, meta=True), cfg, False, torch.device("cpu"))


def record_steps(spec, world: int, micro_batch: int, seq_len: int, stack: str = "today",
                 attention: str = "sdpa", grad_ckpt: bool = True, accumulation: int = 1,
                 steps: int = 2) -> list[tuple]:
    """Allocation events of ``steps`` training steps of ``accumulation`` micro-batches each, of rank 0 of
    ``world`` ranks (bf16 compute, the stack's reduce dtype, AdamW one tensor at a time: its foreach path does
    not trace under fake tensors)."""
    import torch

    _fake_world(world)
    vocab = spec.hf_config["vocab_size"]
    recorder = _recorder()
    original_resize, original_stream = torch.UntypedStorage.resize_, torch.cpu.stream

    def resize_(storage, size):
        recorder.resize(storage, size)
        return original_resize(storage, size)

    @contextlib.contextmanager
    def stream(s):
        recorder.streams.append(s)
        try:
            yield
        finally:
            recorder.streams.pop()

    torch.UntypedStorage.resize_, torch.cpu.stream = resize_, stream
    try:
        masks = _masks_as_a_run_makes_them() if stack != "2023" else contextlib.nullcontext()
        with masks:
            return _steps(spec, world, micro_batch, seq_len, stack, attention, grad_ckpt, accumulation, steps,
                          recorder, vocab)
    finally:
        torch.UntypedStorage.resize_, torch.cpu.stream = original_resize, original_stream


@contextlib.contextmanager
def _masks_as_a_run_makes_them():
    """transformers leaves out the causal mask under SDPA (``is_causal``, grouped key-value heads passed as
    they are) only once it has read the positions and found no packed sequences, which it will not do on a
    fake tensor: it would build a T x T mask, repeat k and v to every head and keep both for the backward,
    which a run on real tensors does not (measured on a Llama-3.1-8B layer at 8192 tokens: 224 MiB more,
    7 GiB over 32 layers without checkpointing). The trace's sequences are one each, as the engine's are."""
    from torch._subclasses.fake_tensor import FakeTensor

    try:  # transformers before 4.53 has no masking_utils: it decided the mask without reading positions
        from transformers import masking_utils
    except ImportError:
        masking_utils = None
    original = getattr(masking_utils, "find_packed_sequence_indices", None)
    if original is None:
        yield
        return

    @functools.wraps(original)
    def one_sequence_each(position_ids, *args, **kwargs):
        return None if isinstance(position_ids, FakeTensor) else original(position_ids, *args, **kwargs)

    masking_utils.find_packed_sequence_indices = one_sequence_each
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original


def _steps(spec, world, micro_batch, seq_len, stack, attention, grad_ckpt, accumulation, steps, recorder, vocab):
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..engine import fsdp1
    from ..engine.models import build_model, enable_checkpointing

    if stack != "2023":  # FSDP2 shards on the meta device, outside fake mode (its device mesh reads ranks)
        model = fake_rank_model(spec, world, attention, grad_ckpt)
    with FakeTensorMode(allow_non_fake_inputs=True):
        if stack == "2023":
            model = build_model(spec, attention, 0, dtype=torch.float32)
            if grad_ckpt:
                enable_checkpointing(model, reentrant=True)
            with recorder:
                model = fsdp1.wrap_2023(model, True, False, torch.device("cpu"))
        else:
            model.to_empty(device="cpu")
        with recorder:
            for p in model.parameters():
                recorder.note((p.to_local() if hasattr(p, "to_local") else p).untyped_storage())
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=False)
            ids = torch.randint(0, vocab, (micro_batch, seq_len))
            for _ in range(steps):
                for micro in range(accumulation):
                    # The engines' accumulation: FSDP2 reduces every micro-batch; FSDP1 as HF 4.28 ran it
                    # keeps unsharded gradients under no_sync() until the step's last one.
                    last = micro == accumulation - 1
                    with contextlib.nullcontext() if stack != "2023" or last else model.no_sync():
                        if stack == "2023":
                            loss = fsdp1.loss_2023(model, {"input_ids": ids, "labels": ids}, vocab)
                        else:
                            loss = model(input_ids=ids, labels=ids).loss
                        recorder.mark("forward")
                        (loss / accumulation).backward()
                        del loss
                    recorder.mark("backward")
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=False)
                optimizer.step()
                # DTensor runs the optimizer's ops on the local shards below this mode: note the states
                # it created (the first step allocates them).
                for state in optimizer.state.values():
                    for value in state.values():
                        if isinstance(value, torch.Tensor) and value.dim() > 0:
                            local = value.to_local() if hasattr(value, "to_local") else value
                            recorder.note(local.untyped_storage())
                optimizer.zero_grad(set_to_none=True)
                recorder.mark("step")
        del model, optimizer
        gc.collect()
    return recorder.events


def trace(spec, method: str, world: int, micro_batch: int, seq_len: int, stack: str, attention: str,
          grad_ckpt: bool, offload: bool, accumulation: int = 1) -> Trace:
    """The allocated and reserved peaks of rank 0, from a fake-tensor run replayed through the allocator."""
    from .allocator import replay

    if method != "fsdp":
        raise UsageError("--trace runs FSDP only: DeepSpeed ZeRO-3 cannot run on a fake process group, so its "
                         "figures are the analytic ones")
    if offload:
        raise UsageError("--trace runs FSDP without offload: offloaded shards live in host memory, which the "
                         "trace does not model; the analytic figures stand")
    start = time.perf_counter()
    events = record_steps(spec, world, micro_batch, seq_len, stack, attention, grad_ckpt, accumulation)
    r = replay([e for e in events if e[0] != "mark"])
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return Trace(r.peak_allocated, r.peak_reserved, time.perf_counter() - start, host, len(events))
