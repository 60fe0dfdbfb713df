"""What the results take from the GPU, checked on one: the CUDA out-of-memory message the failure record parses,
NVML's used memory, the order of the three peaks, and the --max_gpu_memory cap. Marked gpu: skipped without
CUDA (conftest.py); benchmarks/gpu_acceptance.sh runs them first on a GPU machine."""

import time

import pytest
import torch

from shardkit.engine.failures import classify
from shardkit.engine.measure import MemoryMonitor, _NvmlSampler

pytestmark = pytest.mark.gpu
GIB = 2**30


@pytest.fixture(autouse=True)
def _empty_allocator_cache():
    # Each test measures growth from what it starts with: blocks cached by an earlier test would hide it.
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    yield
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def test_cuda_out_of_memory_is_an_oom_on_cuda_with_the_bytes_asked():
    asked = 2**40  # 1 TiB: more than any card, so the allocator refuses at once
    with pytest.raises(torch.OutOfMemoryError) as caught:
        torch.empty(asked, dtype=torch.uint8, device="cuda")
    failure = classify(caught.value, rank=0, step=7)
    assert (failure.kind, failure.device, failure.step) == ("oom", "cuda", 7)
    assert failure.bytes_requested == asked  # "Tried to allocate 1024.00 GiB"
    assert failure.message.startswith("OutOfMemoryError: CUDA out of memory")


def test_nvml_sampler_keeps_the_peak_of_an_allocation_that_is_gone():
    torch.zeros(1, device="cuda")  # the CUDA context first: it belongs in the baseline, not the growth
    sampler = _NvmlSampler(torch.cuda.current_device(), interval_s=0.01)
    sampler.sample()
    before = sampler.peak_bytes
    sampler.start()
    block = torch.ones(2 * GIB, dtype=torch.uint8, device="cuda")  # written, so the pages are really backed
    torch.cuda.synchronize()
    time.sleep(0.3)  # many sampling intervals while the block lives
    del block
    torch.cuda.empty_cache()  # gone from the card before close() takes its last sample
    peak = sampler.close()
    assert before > 0
    assert peak - before >= 2 * GIB


def test_memory_monitor_peaks_are_ordered_allocated_reserved_nvml():
    monitor = MemoryMonitor(interval_s=0.01)
    a = torch.randn(8192, 8192, device="cuda")
    b = a @ a
    torch.cuda.synchronize()
    del a, b
    peaks = monitor.close()
    assert peaks["nvml_error"] is None
    allocated, reserved = peaks["gpu_max_allocated_bytes"], peaks["gpu_max_reserved_bytes"]
    nvml = peaks["gpu_nvml_used_peak_bytes"]
    # Two fp32 8192^2 tensors lived at once; the card (NVML) also holds the context and cached blocks.
    assert 2 * 8192 * 8192 * 4 <= allocated <= reserved <= nvml
    assert peaks["num_alloc_retries"] == 0


def test_memory_cap_refuses_allocations_past_it():
    from shardkit.engine.rank import _cap_gpu_memory

    device = torch.device("cuda", torch.cuda.current_device())
    try:
        assert _cap_gpu_memory(device, 1.0) == pytest.approx(GIB, abs=1)
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(2 * GIB, dtype=torch.uint8, device=device)
        kept = torch.empty(GIB // 2, dtype=torch.uint8, device=device)  # under the cap: still allowed
        assert kept.numel() == GIB // 2
        del kept
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def test_allocator_history_is_a_snapshot_of_segments_streams_and_events(tmp_path):
    import pickle

    from shardkit.engine.measure import allocator_history

    path = tmp_path / "memory_snapshot.pickle"
    side = torch.cuda.Stream()
    with allocator_history(path, torch.device("cuda", torch.cuda.current_device())):
        kept = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
        with torch.cuda.stream(side):
            on_side = torch.empty(32 * 2**20, dtype=torch.uint8, device="cuda")
        del on_side
    snapshot = pickle.loads(path.read_bytes())
    streams = {segment["stream"] for segment in snapshot["segments"]}
    assert len(streams) >= 2  # the side stream's block sits in a segment of its own pool
    events = [e for trace in snapshot["device_traces"] for e in trace]
    assert any(e["action"] == "alloc" and e["size"] == 64 * 2**20 for e in events)
    assert not path.with_name(path.name + ".partial").exists()
    del kept
