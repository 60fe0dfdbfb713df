"""Checks of a resolved run that depend on this machine and its files (installed libraries, devices, a
checkpoint to resume), made before any process starts, as one line."""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING

from ..errors import UsageError

if TYPE_CHECKING:
    from ..spec.resolve import ResolvedRun


def check_engine(run: ResolvedRun, for_training: bool = True) -> None:
    """``for_training`` False (a dry run): only what is wrong on any machine, not what this one lacks."""
    cfg = run.config
    if cfg.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise UsageError("--attn_implementation flash_attention_2: the flash_attn package is not installed "
                         "(pip install flash-attn on a CUDA machine, or use sdpa or eager)")
    if cfg.attn_implementation != "eager":
        from importlib import metadata

        from packaging.version import Version

        installed = metadata.version("transformers")
        if Version(installed) < Version("4.36"):  # the first with attn_implementation; 4.28's LLaMA is eager only
            raise UsageError(f"--attn_implementation {cfg.attn_implementation}: transformers {installed} has only "
                             "eager attention (the table's); use eager")
    if cfg.data_path:
        # Loading the tokenizer takes transformers; every rank would otherwise find a bad one by itself.
        from .data import load_tokenizer

        load_tokenizer(cfg.tokenizer_path or cfg.model_name_or_path)
    if not for_training:
        return
    check_gpu_kernels()
    if run.plan.engine == "hf":
        from .hf_trainer import check_supported

        check_supported(run.plan)
        return
    check_native_engine()
    if cfg.resume_from_checkpoint:
        from . import checkpoints

        checkpoints.verify(checkpoints.find(cfg.resume_from_checkpoint, cfg.output_dir))


def check_native_engine() -> None:
    from ..spec.config import NATIVE_ENGINE_MIN_TORCH, installed_torch_release

    release = installed_torch_release()
    if release is not None and release < NATIVE_ENGINE_MIN_TORCH:
        import torch

        needed = ".".join(map(str, NATIVE_ENGINE_MIN_TORCH))
        raise UsageError(f"--engine native needs torch >= {needed} (FSDP2, and the transformers of its time for "
                         f"ZeRO-3); this is torch {torch.__version__}, the period stack: --engine hf runs HF Trainer, "
                         "the table's own loop")


def has_kernels_for(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a CUDA build with these architectures runs on a GPU of this compute capability: a cubin
    (sm_XY) runs on the same major version at an equal or newer minor one, PTX (compute_XY) is compiled by
    the driver for any newer GPU (NVIDIA's CUDA C++ Programming Guide, "Binary Compatibility")."""
    for arch in arch_list:
        kind, _, number = arch.partition("_")
        built = (int(number[:-1]), int(number[-1]))
        if kind == "sm" and built[0] == capability[0] and built[1] <= capability[1]:
            return True
        if kind == "compute" and built <= capability:
            return True
    return False


def _visible_gpus() -> list[tuple[str, tuple[int, int]]]:
    """Name and compute capability of each GPU this run may use, read from NVML: asking torch would make a
    CUDA context in the launcher, which would count in GPU 0's measured memory."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        gpus = [(pynvml.nvmlDeviceGetName(h), pynvml.nvmlDeviceGetCudaComputeCapability(h)) for h in handles]
    except Exception:  # no driver, no NVML: torch sees no GPU either
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and all(part.strip().isdigit() for part in visible.split(",") if part.strip()):
        gpus = [gpus[int(part)] for part in visible.split(",") if part.strip() and int(part) < len(gpus)]
    return [(name.decode() if isinstance(name, bytes) else name, tuple(cap)) for name, cap in gpus]


def check_gpu_kernels() -> None:
    """A torch build without kernels for the GPU fails at its first kernel, after the ranks have started
    (the period image's torch 2.0.1+cu117 stops at sm_86: A100, A10 and RTX 30xx, not H100 or H200)."""
    import torch

    if not torch.version.cuda:
        return
    for name, capability in _visible_gpus():
        arch_list = torch.cuda.get_arch_list()
        if arch_list and not has_kernels_for(capability, arch_list):
            raise UsageError(f"{name} (sm_{capability[0]}{capability[1]}) cannot run this torch {torch.__version__}, "
                             f"built for {' '.join(arch_list)}: use an image whose torch supports it (shardkit:cuda)")
