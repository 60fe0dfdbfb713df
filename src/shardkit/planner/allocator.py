"""A model of PyTorch's CUDA caching allocator: replays a sequence of allocations and frees and says what it
would reserve (``torch.cuda.max_memory_reserved``) beside what the tensors hold (``max_memory_allocated``).

No torch import: a trace is a list of ``("alloc", key, bytes, stream)`` and ``("free", key)`` events, as a
CPU run records them (tests/test_reserve.py records one of a full-size FSDP2 step under fake tensors). The
rules are those of c10/cuda/CUDACachingAllocator.cpp (pytorch/pytorch; the constants are shared with
c10/core/AllocatorConfig.h), with the default configuration (no max_split_size_mb, no roundup_power2_divisions,
no expandable segments, no garbage-collection threshold):

- every request is rounded up to a multiple of kMinBlockSize (512 bytes);
- requests up to kSmallSize (1 MiB) come from the small pool, carved from 2 MiB segments (kSmallBuffer);
  larger ones from the large pool: a request under kMinLargeAlloc (10 MiB) gets a 20 MiB segment
  (kLargeBuffer), a larger one a segment of its own size rounded up to kRoundLarge (2 MiB);
- each (stream, pool) has its own free blocks: a block freed returns to the pool of the stream that
  allocated it, and only that stream's later requests can use it;
- a request takes the smallest free block of its pool that is large enough (best fit, lowest address on a
  tie), and splits it when what remains is at least kMinBlockSize (small pool) or more than kSmallSize
  (large pool); otherwise it takes the whole block;
- a freed block merges with free neighbours of its segment; segments are never returned (cudaFree happens
  only when an allocation fails, or on empty_cache), so reserved memory only grows.

What it leaves out: the retry that frees cached segments when cudaMalloc fails (the verdict's "at capacity"
is about that), and record_stream's deferred frees (FSDP2 holds references instead; DeepSpeed's, which depend
on how far the CPU runs ahead of the GPU, are the planner's memory_model.zero3_gathered_ahead_terms).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# c10/cuda/CUDACachingAllocator.cpp (pytorch/pytorch), default configuration.
K_MIN_BLOCK_SIZE = 512  # "all sizes are rounded to at least 512 bytes"
K_SMALL_SIZE = 1 << 20  # "largest 'small' allocation is 1 MiB"
K_SMALL_BUFFER = 2 << 20  # "'small' allocations are packed in 2 MiB blocks"
K_LARGE_BUFFER = 20 << 20  # "'large' allocations may be packed in 20 MiB blocks"
K_MIN_LARGE_ALLOC = 10 << 20  # "allocations between 1 and 10 MiB may use kLargeBuffer"
K_ROUND_LARGE = 2 << 20  # "round up large allocations to 2 MiB"


def round_size(size: int) -> int:
    """CUDACachingAllocator round_size (no roundup_power2_divisions)."""
    return K_MIN_BLOCK_SIZE if size < K_MIN_BLOCK_SIZE else -(-size // K_MIN_BLOCK_SIZE) * K_MIN_BLOCK_SIZE


def segment_size(size: int) -> int:
    """CUDACachingAllocator get_allocation_size: what cudaMalloc is asked for when no cached block fits."""
    if size <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if size < K_MIN_LARGE_ALLOC:
        return K_LARGE_BUFFER
    return -(-size // K_ROUND_LARGE) * K_ROUND_LARGE


@dataclass(eq=False)
class _Block:
    segment: int
    offset: int
    size: int
    stream: object
    small: bool
    free: bool = True


@dataclass
class Replay:
    """What a trace costs: peaks of allocated (tensors) and reserved (segments), bytes."""

    peak_allocated: int = 0
    peak_reserved: int = 0
    reserved_by_stream: dict = field(default_factory=dict)
    segments: int = 0


class CachingAllocator:
    def __init__(self) -> None:
        self._free: dict[tuple[object, bool], list[tuple[int, int, int, _Block]]] = {}
        self._segments: dict[int, list[_Block]] = {}
        self._live: dict[object, _Block] = {}
        self.allocated = self.reserved = 0
        self.result = Replay()

    def _pool(self, stream, small):
        return self._free.setdefault((stream, small), [])

    def _insert_free(self, block: _Block) -> None:
        block.free = True
        bisect.insort(self._pool(block.stream, block.small), (block.size, block.segment, block.offset, block))

    def _remove_free(self, block: _Block) -> None:
        pool = self._pool(block.stream, block.small)
        pool.pop(bisect.bisect_left(pool, (block.size, block.segment, block.offset)))
        block.free = False

    def malloc(self, key, size: int, stream=None) -> None:
        size = round_size(size)
        small = size <= K_SMALL_SIZE
        pool = self._pool(stream, small)
        i = bisect.bisect_left(pool, (size, -1, -1))
        if i < len(pool):
            block = pool[i][3]
            self._remove_free(block)
        else:  # cudaMalloc a new segment
            whole = segment_size(size)
            seg = len(self._segments)
            block = _Block(seg, 0, whole, stream, small, free=False)
            self._segments[seg] = [block]
            self.reserved += whole
            self.result.reserved_by_stream[stream] = self.result.reserved_by_stream.get(stream, 0) + whole
            self.result.segments += 1
        remaining = block.size - size
        if remaining >= K_MIN_BLOCK_SIZE if small else remaining > K_SMALL_SIZE:
            rest = _Block(block.segment, block.offset + size, remaining, stream, small)
            blocks = self._segments[block.segment]
            blocks.insert(blocks.index(block) + 1, rest)
            block.size = size
            self._insert_free(rest)
        self._live[key] = block
        self.allocated += block.size
        self.result.peak_allocated = max(self.result.peak_allocated, self.allocated)
        self.result.peak_reserved = max(self.result.peak_reserved, self.reserved)

    def free(self, key) -> None:
        block = self._live.pop(key, None)
        if block is None:
            return
        self.allocated -= block.size
        blocks = self._segments[block.segment]
        i = blocks.index(block)
        # Merge with free neighbours of the same segment (try_merge_blocks).
        for j in (i + 1, i - 1):
            if 0 <= j < len(blocks) and blocks[j].free:
                other = blocks[j]
                self._remove_free(other)
                block.offset = min(block.offset, other.offset)
                block.size += other.size
                blocks.remove(other)
        self._insert_free(block)


def replay(events) -> Replay:
    """Replays ``("alloc", key, bytes, stream)`` and ``("free", key)`` events in order."""
    allocator = CachingAllocator()
    for event in events:
        if event[0] == "alloc":
            allocator.malloc(event[1], event[2], event[3])
        else:
            allocator.free(event[1])
    return allocator.result
