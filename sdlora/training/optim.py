"""Optimisers and learning-rate schedules."""

from __future__ import annotations

import math

import torch

from sdlora.errors import UserError


def make_optimizer(param_groups: list[dict], cfg) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = [{k: v for k, v in g.items()} for g in param_groups]
    if o.optimizer == "adamw":
        fast = {"fused": True} if _all_on_cuda(groups) else {"foreach": True}
        return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, **fast)
    if o.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("optim.optimizer: adamw8bit needs bitsandbytes (pip install 'sdlora[bnb]')") from None
        return bnb.optim.AdamW8bit(groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise UserError("optim.optimizer: prodigy needs prodigyopt (pip install 'sdlora[prodigy]')") from None
    return Prodigy(groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)


def _all_on_cuda(groups) -> bool:
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.is_cuda for p in params)


def lr_lambda(kind: str, warmup_steps: int, total_steps: int):
    """Multiplier on each group's rate at optimiser step `step` (0-based): linear warm-up, then the schedule."""

    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress  # linear

    return f


def make_lr_scheduler(optimizer, cfg):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim.scheduler, cfg.optim.warmup_steps, cfg.train.max_steps))
