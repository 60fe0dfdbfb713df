"""Throughput formulas. Every formula cites its source; unknown hardware gives None, never a guess."""

from __future__ import annotations

import statistics

# Dense bf16 tensor-core peak per GPU, TFLOP/s (without 2:4 sparsity), from NVIDIA's datasheets:
#   A100: "NVIDIA A100 Tensor Core GPU" datasheet (2021), BF16 Tensor Core 312 (624 with sparsity).
#   H100 SXM / PCIe / NVL: "NVIDIA H100 Tensor Core GPU" datasheet (2023), BF16 1,979 / 1,513 / 1,671 with
#     sparsity; dense is half.
#   H200: "NVIDIA H200 Tensor Core GPU" datasheet (2024), BF16 1,979 with sparsity (SXM).
#   L40S: "NVIDIA L40S" datasheet (2023), BF16 362.05 dense (733 with sparsity).
#   L4: "NVIDIA L4" datasheet (2023), BF16 121 dense (242 with sparsity).
#   A10: "NVIDIA A10" datasheet (2021), BF16 125 dense (250 with sparsity).
# Matched against torch.cuda.get_device_name(); the first pattern contained in the name wins, so the more
# specific names come first.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H100 NVL", 835.5),
    ("H100 PCIe", 756.5),
    ("H100", 989.4),  # SXM (HBM3), e.g. "NVIDIA H100 80GB HBM3"
    ("H200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.05),
    ("L4", 121.0),
    ("A10", 125.0),
]


def peak_bf16_flops(device_name: str | None) -> float | None:
    """FLOP/s of one GPU, or None when the card is not in the table (then MFU is None)."""
    if not device_name:
        return None
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if pattern in device_name:
            return tflops * 1e12
    return None


def model_flops_per_token(matmul_params: int, layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token, forward and backward: 6N + 12 L H S.

    Chowdhery et al. 2022, "PaLM", Appendix B: N counts the matmul (non-embedding) parameters, the second
    term is the attention score and value products. Recomputation from activation checkpointing is not
    counted (that is hardware FLOPs, below)."""
    return 6.0 * matmul_params + 12.0 * layers * hidden * seq_len


def hardware_flops_per_token(matmul_params: int, layers: int, hidden: int, seq_len: int,
                             checkpointing: bool) -> float:
    """Model FLOPs plus one extra forward (2N + 4 L H S) when each layer is recomputed in backward
    (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", Sec. 6: HFU
    counts the recomputation, MFU does not)."""
    extra = 2.0 * matmul_params + 4.0 * layers * hidden * seq_len if checkpointing else 0.0
    return model_flops_per_token(matmul_params, layers, hidden, seq_len) + extra


def utilization(flops_per_token: float, tokens_per_s_per_gpu: float | None, peak: float | None) -> float | None:
    """Achieved FLOP/s over the card's peak (MFU or HFU, depending on the FLOPs given)."""
    if peak is None or tokens_per_s_per_gpu is None:
        return None
    return flops_per_token * tokens_per_s_per_gpu / peak


def steady_state(step_times: list[float], excluded: int) -> dict | None:
    """Median step time after the warm-up steps, with its spread (min, max, quartiles).

    None when no step is left after the excluded ones."""
    steady = step_times[excluded:]
    if not steady:
        return None
    quartiles = statistics.quantiles(steady, n=4) if len(steady) > 1 else [steady[0]] * 3
    return {"steps": len(steady), "median_s": statistics.median(steady), "min_s": min(steady),
            "max_s": max(steady), "p25_s": quartiles[0], "p75_s": quartiles[2]}
