"""The optimizer of both stages: AdamW with the stage's betas, and the learning-rate schedule.

    optimizer = adamw(model, cfg, "rl")
    lr = set_lr(optimizer, lr_at(step, total, cfg.rl_warmup, cfg.rl_lr))
    grad_norm = clipped_step(model, optimizer, cfg.grad_clip)   # nan: the update was skipped

AdamW is torch's (decoupled weight decay, `weight_decay` in the config: 0 in every preset). The schedule is
ours for both stages: linear warm-up, then cosine decay to 0 at the last step (docs/method.md, "Optimizer").
"""
import math

import torch

from atlas_min.dist import clip_grad_norm


def adamw(model, cfg, stage):
    """AdamW over the model's (sharded) parameters with `stage`'s ("sft" or "rl") peak lr and betas."""
    lr, beta1, beta2 = (getattr(cfg, f"{stage}_{knob}") for knob in ("lr", "beta1", "beta2"))
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(beta1, beta2), weight_decay=cfg.weight_decay)


def lr_at(step, total, warmup, peak):
    """Linear warm-up to `peak` over `warmup` steps (step 0 gets peak/warmup), then cosine decay to 0 at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer, lr):
    """Every parameter group's lr is `lr`; returns it."""
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr
    return lr


def clipped_step(model, optimizer, max_norm):
    """Clip the global gradient norm to `max_norm`, apply the update, clear the gradients; returns the norm.

    A norm that is not finite (a NaN or inf anywhere in the gradient) is not applied: one such update
    would turn every weight AdamW touches into NaN. The gradients are cleared and the norm returned, so
    the caller counts the skip (docs/method.md, "Numerical guards"). Under FSDP the norm is global, so
    every rank takes the same decision.
    """
    norm = clip_grad_norm(model, max_norm)
    if math.isfinite(norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


class DivergedError(ValueError):
    """A run whose loss or gradient norm stayed non-finite (`count_nonfinite`): it stops, unsaved."""


def count_nonfinite(streak, finite, step, total, limit):
    """Steps in a row, up to `step` (0-based) of `total`, whose loss or gradient norm was not finite (`finite`
    is False): 0 after a finite step. Raises DivergedError when that reaches `limit` (cfg.max_nonfinite_steps),
    or when the run's last step is one: the final model is never the weights of a non-finite step. The
    trainers save no checkpoint while the count is above 0, so the last one saved is from a finite step."""
    streak = 0 if finite else streak + 1
    if streak and (streak >= limit or step + 1 == total):
        raise DivergedError(f"step {step + 1}: the loss or gradient norm was not finite for {streak} step(s) in a "
                            f"row (max_nonfinite_steps={limit}): the run diverged and stops without saving them; "
                            "its last checkpoint is from a finite step (lower the learning rate?)")
    return streak
