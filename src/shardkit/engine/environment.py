"""What the run ran on: hardware, driver, library versions, code and container identity."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

LIBRARIES = ("torch", "transformers", "accelerate", "deepspeed", "flash-attn", "shardkit")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """The commit of the shardkit checkout (images set SHARDKIT_GIT_COMMIT at build time instead)."""
    if os.environ.get("SHARDKIT_GIT_COMMIT"):
        return os.environ["SHARDKIT_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else version
    except Exception:  # no driver, no NVML: the field stays empty
        return None


def capture(world_size: int) -> dict:
    cuda = torch.cuda.is_available()
    gpu = None
    if cuda:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        gpu = {"name": props.name, "memory_bytes": props.total_memory, "count_visible": torch.cuda.device_count(),
               "compute_capability": f"{props.major}.{props.minor}"}
    return {
        "device": "cuda" if cuda else "cpu",
        "gpu": gpu,
        "world_size": world_size,
        "driver": _driver_version() if cuda else None,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        # DeepSpeed's CPU Adam (offload rows) runs on these threads: part of what the time measures.
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        # The caching allocator's configuration the run used (unset: torch's default).
        "allocator_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "versions": {name: _version(name) for name in LIBRARIES},
        "git_commit": git_commit(),
        "container_image": os.environ.get("SHARDKIT_IMAGE_DIGEST"),
    }
