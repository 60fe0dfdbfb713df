"""Checks of a resolved run that depend on this machine and its files (installed libraries, devices, a
checkpoint to resume), made before any process starts, as one line."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from ..errors import UsageError

if TYPE_CHECKING:
    from ..spec.resolve import ResolvedRun


def check_engine(run: ResolvedRun) -> None:
    cfg = run.config
    if cfg.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise UsageError("--attn_implementation flash_attention_2: the flash_attn package is not installed "
                         "(pip install flash-attn on a CUDA machine, or use sdpa or eager)")
    if cfg.data_path:
        # Loading the tokenizer takes transformers; every rank would otherwise find a bad one by itself.
        from .data import load_tokenizer

        load_tokenizer(cfg.tokenizer_path or cfg.model_name_or_path)
    if run.plan.engine == "hf":
        from .hf_trainer import check_supported

        check_supported(run.plan)
    elif cfg.resume_from_checkpoint:
        from . import checkpoints

        checkpoints.verify(checkpoints.find(cfg.resume_from_checkpoint, cfg.output_dir))
