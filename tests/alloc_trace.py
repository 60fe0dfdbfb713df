"""Records what one rank of an FSDP2 job allocates and frees, in order and on which stream, without allocating
it: the model is built on the meta device, fully_shard-ed over a fake process group, materialized inside
FakeTensorMode, and two training steps are run under a dispatch mode that notes every new storage, every
storage resize (FSDP2 allocates and frees unsharded parameters with resize_) and every storage's death.
The stream is the one FSDP2 entered with ``device_handle.stream(...)`` (torch.cpu.stream here, patched to
remember it): the caching allocator keeps a pool per stream. Used by tests/test_reserve.py."""

from __future__ import annotations

import contextlib
import gc
import types
import weakref

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

DEFAULT = "default"


class Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.events: list[tuple] = []
        self.streams: list = [DEFAULT]
        self._sizes: dict[int, int] = {}
        self._next = 0
        self.collect = False

    def _key(self, storage) -> int | None:
        return getattr(storage, "_shardkit_key", None)

    def note(self, storage) -> None:
        if self._key(storage) is not None or storage.nbytes() == 0:
            return
        key = self._next
        self._next += 1
        storage._shardkit_key = key
        self.events.append(("alloc", key, storage.nbytes(), self.streams[-1], str(getattr(self, "func", ""))))
        self._sizes[key] = storage.nbytes()
        weakref.finalize(storage, self.events.append, ("free", key))

    def mark(self, name: str) -> None:
        if self.collect:
            gc.collect()
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
        # An in-place op returns its input: it allocates nothing. Meta tensors are DTensor's shape inference
        # on global shapes (cached by its sharding propagator), not memory.
        if func._schema.name.endswith("_") or (kwargs or {}).get("out") is not None:
            return out
        for t in torch.utils._pytree.tree_leaves(out):
            # A DTensor is a wrapper: its local tensor, which this mode also sees, holds the memory.
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and not isinstance(t, DTensor):
                self.func = func
                self.note(t.untyped_storage())
        return out


def fake_rank_model(model_name: str, world: int):
    """Rank 0 of ``world`` ranks of a full-size LLaMA, as shardkit's FSDP2 engine wraps it (one unit per decoder
    layer, checkpointing, bf16 parameters with fp32 reduce), built on the meta device over a fake process
    group; the caller materializes it (``to_empty``) inside FakeTensorMode. Returns the model and its spec."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from shardkit.engine import fsdp
    from shardkit.engine.models import build_model
    from shardkit.spec.presets import LLAMA1_COMMON, PRESETS, ModelSpec, preset_name

    name = preset_name(model_name)
    spec = ModelSpec(name, {**LLAMA1_COMMON, **PRESETS[name]}, None)
    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    model = build_model(spec, "eager", 0, meta=True)
    fsdp.parallelize(model, types.SimpleNamespace(gradient_checkpointing=True, bf16=True), False,
                     torch.device("cpu"))
    return model, spec


def record_fsdp2_steps(model_name: str, world: int, batch: int = 1, seq: int | None = None, steps: int = 2):
    """Events of ``steps`` training steps of rank 0 of ``world`` ranks (checkpointing, eager attention, bf16
    compute with fp32 reduce, AdamW for-loop: the foreach path does not trace under fake tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    model, spec = fake_rank_model(model_name, world)
    seq = seq or spec.hf_config["max_position_embeddings"]
    recorder = Recorder()
    original_resize = torch.UntypedStorage.resize_
    original_stream = torch.cpu.stream

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

    torch.UntypedStorage.resize_ = resize_
    torch.cpu.stream = stream
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            model.to_empty(device="cpu")
            with recorder:
                for p in model.parameters():
                    recorder.note(p.to_local().untyped_storage())
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=False)
                ids = torch.randint(0, spec.hf_config["vocab_size"], (batch, seq))
                for _ in range(steps):
                    loss = model(input_ids=ids, labels=ids).loss
                    recorder.mark("forward")
                    loss.backward()
                    del loss
                    recorder.mark("backward")
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=False)
                    optimizer.step()
                    # DTensor runs the optimizer's ops on the local shards below this mode: note the states
                    # it created (the first step allocates them; fused AdamW on CUDA makes no temporaries).
                    for state in optimizer.state.values():
                        for value in state.values():
                            if isinstance(value, DTensor):
                                recorder.note(value.to_local().untyped_storage())
                    optimizer.zero_grad(set_to_none=True)
                    recorder.mark("step")
    finally:
        torch.UntypedStorage.resize_ = original_resize
        torch.cpu.stream = original_stream
    return recorder.events
