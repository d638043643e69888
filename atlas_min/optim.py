"""The optimizer of both stages: AdamW with the stage's betas, and the learning-rate schedule.

    optimizer = adamw(model, cfg, "rl")
    set_lr(optimizer, lr_at(step, total, cfg.rl_warmup, cfg.rl_lr))
"""
import math

import torch


def adamw(model, cfg, stage):
    """AdamW over the model's (sharded) parameters with `stage`'s ("sft" or "rl") peak lr and betas."""
    if stage == "sft":
        lr, betas = cfg.sft_lr, (cfg.sft_beta1, cfg.sft_beta2)
    else:
        lr, betas = cfg.rl_lr, (cfg.rl_beta1, cfg.rl_beta2)
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=cfg.weight_decay)


def lr_at(step, total, warmup, peak):
    """Linear warm-up to `peak` over `warmup` steps (step 0 gets peak/warmup), then cosine decay to 0 at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer, lr):
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr
