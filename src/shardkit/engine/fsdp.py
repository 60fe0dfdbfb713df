"""FSDP2 (``fully_shard``) applied from outside the model, in torchtitan's order: activation
checkpointing first, then one FSDP unit per decoder layer, then the root.

FSDP2 shards on CPU over gloo as on GPU (parameters become DTensor shards), unlike HF Trainer's FSDP path,
which wraps the model in DDP on CPU. Newer-API module: imported only by the native engine, never on the
2023 stack's HF path."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from .models import build_model, decoder_layers, enable_checkpointing
from .optim import adamw, linear_schedule

if TYPE_CHECKING:
    from ..spec.resolve import ResolvedRun


def parallelize(model, cfg, offload_to_cpu: bool, device: torch.device):
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cfg.bf16 else None, reduce_dtype=torch.float32)
    # Pinned host memory needs an accelerator: CPUOffloadPolicy's default pinning fails without one
    # ("Cannot access accelerator device when none is available").
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload_to_cpu else OffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mixed, offload_policy=offload)
    fully_shard(model, mp_policy=mixed, offload_policy=offload)
    return model


def _load_full_weights(folder: str) -> dict:
    files = sorted(Path(folder).glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        return {k: v for f in files for k, v in load_file(f).items()}
    return {k: v for f in sorted(Path(folder).glob("pytorch_model*.bin"))
            for k, v in torch.load(f, map_location="cpu", weights_only=True).items()}


class FsdpStrategy:
    def __init__(self, run: ResolvedRun, device: torch.device):
        cfg, plan = run.config, run.plan
        self.cfg = cfg
        offload = plan.parallelism.offload
        model = parallelize(build_model(plan.model, cfg.attn_implementation, cfg.seed, meta=True), cfg, offload,
                            device)
        # Materialize only this rank's shards: with offload they live on the CPU.
        model.to_empty(device="cpu" if offload else device)
        torch.manual_seed(cfg.seed)
        with torch.no_grad():
            model.init_weights()  # also recomputes the rotary buffers, which to_empty left undefined
        if plan.model.weights_dir:
            # Only rank 0 reads the files; each rank receives its shards (torchtitan's approach).
            rank0 = torch.distributed.get_rank() == 0
            full = _load_full_weights(plan.model.weights_dir) if rank0 else {}
            set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True,
                                                                      broadcast_from_rank0=True))
        self.model = model
        self.optimizer = adamw(model, cfg, fused=device.type == "cuda" and not offload)
        self.scheduler = linear_schedule(self.optimizer, plan)
        self.accumulation = plan.gradient_accumulation_steps
        self.gradient_bytes = 0

    def micro_step(self, batch: dict, last: bool):
        # Every micro-batch reduce-scatters its gradients into the fp32 shards (torchtitan does the same).
        # Skipping the sync until the last micro-batch (set_requires_gradient_sync) would save communication
        # but hold the whole model's unsharded gradients, upcast to fp32 (4 bytes per parameter: 27 GB for
        # LLaMA-7B): docs/planner.md.
        loss = self.model(**batch).loss
        (loss / self.accumulation).backward()
        return loss.detach()

    def optimizer_step(self) -> None:
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        if not self.gradient_bytes:
            # What this rank holds of the gradients at their largest (read once, for the planner's exact check).
            self.gradient_bytes = sum(p.grad.to_local().nbytes for p in self.model.parameters() if p.grad is not None)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def current_lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, folder: Path) -> None:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))
        if torch.distributed.get_rank() == 0:
            torch.save(self.scheduler.state_dict(), folder / "scheduler.pt")

    def load(self, folder: Path) -> None:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(folder))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))

    def holdings(self) -> dict:
        params = {name: {"local": p.to_local().numel(), "global": p.numel()}
                  for name, p in self.model.named_parameters()}
        state_bytes = sum(t.to_local().nbytes if hasattr(t, "to_local") else t.nbytes
                          for state in self.optimizer.state.values() for t in state.values()
                          if isinstance(t, torch.Tensor) and t.dim() > 0)
        return {"parameters": params, "optimizer_state_bytes": state_bytes, "gradient_bytes": self.gradient_bytes}
