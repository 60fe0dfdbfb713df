"""Per-rank measurements: synchronized step times, peak memory (torch allocator, NVML, host RSS).

Importable on the 2023 stack (torch 2.0): nothing at import needs a newer API (``allocator_history`` does,
when used)."""

from __future__ import annotations

import os
import resource
import threading
import time
from contextlib import contextmanager

import torch


def synchronize() -> None:
    """Wait for queued GPU work, so a host clock read after it includes that work."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# The allocator keeps this many of its latest events: more than two optimizer steps of a 7B replay's
# allocations and frees, and without tracebacks a few MiB once compressed.
HISTORY_ENTRIES = 200_000


@contextmanager
def allocator_history(path, device):
    """The CUDA caching allocator's own record of a run, written to ``path`` as a torch memory snapshot:
    every segment and block with its size and stream, and the latest allocations and frees, without
    tracebacks; pytorch.org/memory_viz reads it). Nothing without a GPU or without a path. Written when the
    run ends, an out-of-memory included (the history that matters most), to a temporary name and renamed: a
    run killed while writing leaves no torn snapshot. Needs torch 2.1's keywords; only asked for on today's."""
    if path is None or device.type != "cuda":
        yield
        return
    torch.cuda.memory._record_memory_history(enabled="all", context=None, stacks="python",
                                             max_entries=HISTORY_ENTRIES)
    try:
        yield
    finally:
        try:
            partial = f"{path}.partial"
            torch.cuda.memory._dump_snapshot(partial)
            os.replace(partial, path)
        except OSError:  # a full disk must not replace the run's own ending
            pass
        torch.cuda.memory._record_memory_history(enabled=None)


class StepClock:
    """Wall time of each optimizer step, with the device synchronized at both ends."""

    def __init__(self, times: list[float]):
        self.times = times  # the recorder's list: a failure mid-run still has the steps done
        self._start = None

    def start(self) -> None:
        synchronize()
        self._start = time.perf_counter()

    def stop(self) -> float:
        synchronize()
        elapsed = time.perf_counter() - self._start
        self.times.append(elapsed)
        return elapsed


class _NvmlSampler(threading.Thread):
    """Samples the GPU's used memory as NVML (and nvidia-smi) reports it: the whole card, so it includes
    the CUDA context and the caching allocator's free blocks, which torch's counters do not."""

    def __init__(self, device_index: int, interval_s: float):
        super().__init__(daemon=True, name="nvml-sampler")
        import pynvml  # from nvidia-ml-py

        pynvml.nvmlInit()
        self._nvml = pynvml
        uuid = getattr(torch.cuda.get_device_properties(device_index), "uuid", None)
        self._handle = (pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}") if uuid is not None
                        else pynvml.nvmlDeviceGetHandleByIndex(device_index))
        self.interval_s, self.peak_bytes = interval_s, 0
        self._stop = threading.Event()

    def sample(self) -> None:
        used = self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used
        self.peak_bytes = max(self.peak_bytes, int(used))

    def run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def close(self) -> int:
        self._stop.set()
        self.join(timeout=5)
        self.sample()
        return self.peak_bytes


class MemoryMonitor:
    """Peak memory of this rank over the whole run (torch counters are reset at start)."""

    def __init__(self, interval_s: float):
        self._nvml = None
        self.nvml_error = None
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            try:
                self._nvml = _NvmlSampler(torch.cuda.current_device(), interval_s)
                self._nvml.start()
            except Exception as error:  # NVML is a bonus over torch's counters, never a reason to fail
                self.nvml_error = f"{type(error).__name__}: {error}"

    def current(self) -> dict:
        """For the progress line: what torch holds right now."""
        if torch.cuda.is_available():
            return {"gpu_reserved_bytes": torch.cuda.memory_reserved()}
        return {"host_rss_peak_bytes": host_rss_peak_bytes()}

    def close(self) -> dict:
        peaks = {"host_rss_peak_bytes": host_rss_peak_bytes(), "gpu_max_reserved_bytes": None,
                 "gpu_max_allocated_bytes": None, "gpu_nvml_used_peak_bytes": None, "num_alloc_retries": None,
                 "nvml_error": self.nvml_error}
        if torch.cuda.is_available():
            stats = torch.cuda.memory_stats()
            peaks.update(gpu_max_reserved_bytes=torch.cuda.max_memory_reserved(),
                         gpu_max_allocated_bytes=torch.cuda.max_memory_allocated(),
                         num_alloc_retries=stats.get("num_alloc_retries", 0))
            if self._nvml is not None:
                peaks["gpu_nvml_used_peak_bytes"] = self._nvml.close()
        return peaks


def host_rss_peak_bytes() -> int:
    """This process's peak resident set (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def matmul_bf16_flops(size: int = 4096, repeats: int = 20) -> float | None:
    """The GPU's achieved bf16 matmul rate, measured once at start (the diff normalizes time with it when the
    card is not in the peak table). Random data: a bf16 matmul on zeros was measured 13% faster than on random
    data on an H200. None on CPU."""
    if not torch.cuda.is_available():
        return None
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1000
    del a, b
    torch.cuda.empty_cache()
    return 2 * size**3 * repeats / seconds

