"""The table's FSDP on today's torch: FSDP1 (``FullyShardedDataParallel``) configured as HF Trainer 4.28
configured it on torch 2.0, so that the 2023 stack's memory behaviours can be run and measured, not only
read (``--stack 2023``; the planner's 2023 terms, docs/planner.md).

Each choice and its source:
- every rank first builds the whole model in fp32 (Alpaca's train.py calls ``from_pretrained`` on each rank
  before the Trainer wraps it): the host holds one full copy per rank while loading;
- one FSDP unit per decoder layer (``LlamaDecoderLayer``) (transformer_auto_wrap_policy, HF's ``--fsdp auto_wrap``), the rest
  in the root; FULL_SHARD; flat parameters (``use_orig_params=False``, 4.28 did not set it);
- ``MixedPrecision(param_dtype=bf16, reduce_dtype=bf16, buffer_dtype=bf16)`` with ``--bf16`` (4.28
  ``Trainer._wrap_model``), gradients reduce-scattered in bf16 and kept in the fp32 shard;
- ``backward_prefetch=BACKWARD_PRE``, ``forward_prefetch=False``, ``limit_all_gathers=False`` (4.28
  ``Trainer.__init__``: the fsdp_config defaults; torch 2.0's rate limiter was off by default);
- ``CPUOffload(offload_params=True)`` with ``--fsdp offload``;
- reentrant activation checkpointing (torch 2.0's ``checkpoint`` default, which 4.28's LLaMA called);
- every micro-batch but the last of an optimizer step runs under ``model.no_sync()`` (4.28's
  ``_no_sync_in_gradient_accumulation`` is true for FSDP), so each unit keeps its *unsharded* gradient until
  the step's last backward;
- the loss on the logits in the compute dtype (4.28's ``LlamaForCausalLM`` had no fp32 upcast);
- ``model.clip_grad_norm_`` (FSDP1's own), then AdamW one tensor at a time (4.28's default ``adamw_hf``).

Newer-API module: imported only by the native engine with ``--stack 2023``."""

from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING

import torch
from torch.distributed.fsdp import BackwardPrefetch, CPUOffload, MixedPrecision, ShardingStrategy
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

from ..errors import UsageError
from .fsdp import FsdpStrategy
from .models import build_model, decoder_layer_class, enable_checkpointing
from .optim import adamw, linear_schedule

if TYPE_CHECKING:
    from ..spec.resolve import ResolvedRun


def wrap_2023(model, bf16: bool, offload_to_cpu: bool, device: torch.device):
    dtype = torch.bfloat16 if bf16 else None
    mixed = MixedPrecision(param_dtype=dtype, reduce_dtype=dtype, buffer_dtype=dtype) if bf16 else None
    return FSDP(model, sharding_strategy=ShardingStrategy.FULL_SHARD,
                cpu_offload=CPUOffload(offload_params=offload_to_cpu),
                auto_wrap_policy=functools.partial(transformer_auto_wrap_policy,
                                                   transformer_layer_cls={decoder_layer_class(model)}),
                mixed_precision=mixed, device_id=device, backward_prefetch=BackwardPrefetch.BACKWARD_PRE,
                forward_prefetch=False, limit_all_gathers=False)


def loss_2023(model, batch: dict, vocab: int) -> torch.Tensor:
    """4.28's LlamaForCausalLM loss: shifted logits in the compute dtype, no fp32 upcast."""
    logits = model(input_ids=batch["input_ids"]).logits
    return torch.nn.functional.cross_entropy(logits[..., :-1, :].reshape(-1, vocab), batch["labels"][..., 1:].reshape(-1))


class Fsdp1Strategy(FsdpStrategy):
    """FSDP1 as the table ran it; checkpoints, the learning rate and the schedule are FSDP2's
    (torch.distributed.checkpoint handles both)."""

    def __init__(self, run: ResolvedRun, device: torch.device):
        cfg, plan = run.config, run.plan
        offload = plan.parallelism.offload
        if offload and device.type != "cuda":
            # FSDP1 pins the offloaded shards unconditionally; pinning needs an accelerator.
            raise UsageError("--stack 2023 with --fsdp offload needs a GPU: FSDP1's CPUOffload pins host memory, "
                             "which fails without an accelerator")
        self.cfg = cfg
        model = build_model(plan.model, cfg.attn_implementation, cfg.seed, dtype=torch.float32)
        self.load_copy_bytes = sum(p.nbytes for p in model.parameters())
        if cfg.gradient_checkpointing:
            enable_checkpointing(model, reentrant=True)
        self.model = wrap_2023(model, cfg.bf16, offload, device)
        self.optimizer = adamw(self.model, cfg, fused=False, flat_parameters=True)
        self.scheduler = linear_schedule(self.optimizer, plan)
        self.accumulation = plan.gradient_accumulation_steps
        self.vocab = plan.model.hf_config["vocab_size"]
        self.gradient_bytes = 0
        self.unsharded_gradient_bytes = 0

    def _loss(self, batch: dict) -> torch.Tensor:
        return loss_2023(self.model, batch, self.vocab)

    def micro_step(self, batch: dict, last: bool):
        # Only the last micro-batch reduce-scatters; the others keep their unsharded gradients, as HF 4.28 did.
        with contextlib.nullcontext() if last else self.model.no_sync():
            loss = self._loss(batch)
            (loss / self.accumulation).backward()
        if not last and not self.unsharded_gradient_bytes:
            self.unsharded_gradient_bytes = sum(p.grad.nbytes for p in self.model.parameters() if p.grad is not None)
        return loss.detach()

    def optimizer_step(self) -> None:
        if self.cfg.max_grad_norm > 0:
            self.model.clip_grad_norm_(self.cfg.max_grad_norm)
        if not self.gradient_bytes:
            self.gradient_bytes = sum(p.grad.nbytes for p in self.model.parameters() if p.grad is not None)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def holdings(self) -> dict:
        """Per FlatParameter (one per unit): the padded slice this rank holds, against the unit's elements."""
        params = {name: {"local": p.numel(), "global": p._unpadded_unsharded_size.numel()}
                  for name, p in self.model.named_parameters()}
        state_bytes = sum(t.nbytes for state in self.optimizer.state.values() for t in state.values()
                          if isinstance(t, torch.Tensor) and t.dim() > 0)
        return {"parameters": params, "optimizer_state_bytes": state_bytes, "gradient_bytes": self.gradient_bytes,
                "unsharded_gradient_bytes": self.unsharded_gradient_bytes, "load_copy_bytes": self.load_copy_bytes}
