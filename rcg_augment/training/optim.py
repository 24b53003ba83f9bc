"""Optimiser and EMA: the learning rate (official scaling rules, warm-up + cosine), AdamW's
parameter groups, and the EMA update."""

from __future__ import annotations

import math

import torch
from torch import nn

from .stage import Stage, TrainConfig

_NO_WEIGHT_DECAY = ("pos_embed", "position_embeddings", "cls_token", "fake_latent", "mask_token")


def resolve_lr(stage: Stage, config: TrainConfig, effective_batch: int) -> float:
    """The absolute learning rate: ``lr`` if given, else the stage's scaling rule on ``blr``."""
    if config.lr is not None:
        return float(config.lr)
    blr = stage.default_blr if config.blr is None else config.blr
    return blr * effective_batch / (256.0 if stage.lr_scaling == "per256" else 1.0)


def lr_at(step: int, *, lr: float, steps: int, warmup: int, schedule: str, min_lr: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_lr`` (or constant)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant" or steps <= warmup:
        return lr
    progress = (step - warmup) / max(1, steps - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(".bias") or any(k in name for k in _NO_WEIGHT_DECAY)
        (no_decay if skip else decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the stage's module has no trainable parameters")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, *, copy_buffers: bool) -> None:
    """``ema = decay * ema + (1 - decay) * model`` for parameters; buffers copied if asked."""
    params = dict(model.named_parameters())
    for name, e in ema.named_parameters():
        e.lerp_(params[name].detach().to(e.dtype), 1.0 - decay)
    if copy_buffers:
        buffers = dict(model.named_buffers())
        for name, b in ema.named_buffers():
            b.copy_(buffers[name])


__all__ = ["ema_update", "lr_at", "param_groups", "resolve_lr"]
