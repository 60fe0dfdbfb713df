"""AdamW and the linear warm-up/decay schedule, as HF Trainer sets them up for the seed's flags."""

from __future__ import annotations

import torch


def adamw(model, cfg, fused: bool, flat_parameters: bool = False):
    """``flat_parameters``: the model is FSDP1's, whose FlatParameters mix matrices and norms in one tensor.
    HF Trainer 4.28 picked the parameters to decay by name, and no FlatParameter is named like a bias or a
    norm, so every one decayed; its default optimizer (adamw_hf) stepped one tensor at a time (foreach off)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if flat_parameters:
        groups = [{"params": trainable, "weight_decay": cfg.weight_decay}]
    else:
        # Decay matrices only, not norms (nanoGPT's configure_optimizers rule; HF excludes norms and biases too).
        groups = [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]
    options = {"fused": True} if fused else {"foreach": not flat_parameters}
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_epsilon, **options)


def linear_schedule(optimizer, plan):
    """transformers.get_linear_schedule_with_warmup: 0 -> lr over the warm-up, then linearly to 0."""
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, plan.warmup_steps, plan.total_steps)
