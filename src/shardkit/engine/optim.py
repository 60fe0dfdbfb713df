"""AdamW and the linear warm-up/decay schedule, as HF Trainer sets them up for the seed's flags."""

from __future__ import annotations

import torch


def adamw(model, cfg, fused: bool):
    # Decay matrices only, not norms (nanoGPT's configure_optimizers rule; HF excludes norms and biases too).
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    options = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_epsilon, **options)


def linear_schedule(optimizer, plan):
    """transformers.get_linear_schedule_with_warmup: 0 -> lr over the warm-up, then linearly to 0."""
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, plan.warmup_steps, plan.total_steps)
