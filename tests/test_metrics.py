"""Throughput formulas against hand-computed values; unknown hardware gives no MFU."""

import pytest

from shardkit.results import metrics


def test_model_flops_per_token_for_7b_layer_shaped_model():
    # Measured on an H100 80GB: 8 LLaMA-7B layers + LM head = 1.75e9 matmul parameters, sequence 2048.
    matmul = 8 * (4 * 4096**2 + 3 * 4096 * 11008) + 4096 * 32000
    expected = 6 * matmul + 12 * 8 * 4096 * 2048
    assert metrics.model_flops_per_token(matmul, 8, 4096, 2048) == expected
    assert expected == pytest.approx(1.13e10, rel=0.01)


def test_full_7b_run_needs_the_flops_the_seeds_numbers_imply():
    # The table's arithmetic: about 4.3e10 FLOPs per token and 1.58e18 in all for 36.9M tokens.
    matmul = 32 * (4 * 4096**2 + 3 * 4096 * 11008) + 4096 * 32000
    per_token = metrics.model_flops_per_token(matmul, 32, 4096, 2048)
    assert per_token == pytest.approx(4.3e10, rel=0.02)
    assert per_token * 6000 * 2048 * 3 == pytest.approx(1.58e18, rel=0.02)


def test_hardware_flops_add_one_forward_when_checkpointing():
    base = metrics.model_flops_per_token(10, 2, 4, 8)
    assert metrics.hardware_flops_per_token(10, 2, 4, 8, checkpointing=False) == base
    assert metrics.hardware_flops_per_token(10, 2, 4, 8, checkpointing=True) == base + 2 * 10 + 4 * 2 * 4 * 8


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA L40S", 362.05), ("NVIDIA L4", 121.0),
])
def test_peak_table_matches_specific_names_first(name, tflops):
    assert metrics.peak_bf16_flops(name) == tflops * 1e12


@pytest.mark.parametrize("name", [None, "", "Tesla V100-SXM2-32GB", "cpu"])
def test_unknown_hardware_has_no_mfu(name):
    assert metrics.peak_bf16_flops(name) is None
    assert metrics.utilization(1e9, 1000.0, metrics.peak_bf16_flops(name)) is None


def test_mfu_matches_the_h100_hf_trainer_fsdp_measurement():
    # Measured with HF Trainer (FSDP) on one H100 80GB: 27,657 tokens/s at 1.13e10 FLOPs/token -> 313 TFLOP/s, 31.6% of 989.
    matmul = 8 * (4 * 4096**2 + 3 * 4096 * 11008) + 4096 * 32000
    flops = metrics.model_flops_per_token(matmul, 8, 4096, 2048)
    mfu = metrics.utilization(flops, 27_657, metrics.peak_bf16_flops("NVIDIA H100 80GB HBM3"))
    assert mfu == pytest.approx(0.316, abs=0.002)


def test_steady_state_leaves_out_warmup():
    state = metrics.steady_state([5.0, 2.0, 1.0, 1.2, 0.8], excluded=2)
    assert state["steps"] == 3 and state["median_s"] == 1.0
    assert (state["min_s"], state["max_s"]) == (0.8, 1.2)
    assert metrics.steady_state([5.0, 2.0], excluded=2) is None


def test_a_memory_snapshot_asked_for_on_cpu_is_not_made(tmp_path):
    """The allocator history is CUDA's: on CPU the flag changes nothing and the run is as without it."""
    from shardkit.engine.measure import allocator_history

    path = tmp_path / "memory_snapshot.pickle"
    with allocator_history(path, __import__("torch").device("cpu")):
        pass
    assert not path.exists()
