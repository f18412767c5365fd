"""Optimisers and learning-rate schedules."""

from __future__ import annotations

import math

import torch

from sdlora.adapter.names import PARTS
from sdlora.errors import UserError


def make_optimizer(param_groups: list[dict], cfg) -> torch.optim.Optimizer:
    o = cfg.optim
    check_rates(param_groups, cfg)
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


def check_rates(param_groups: list[dict], cfg) -> None:
    """Refuse rates the optimiser cannot take, naming the key that set them (`UserError`). Prodigy (Mishchenko &
    Defazio 2023) keeps one step-size estimate d for all groups and steps every group at d·lr with a single lr:
    prodigyopt 1.1 raises at the first step when groups' rates differ (0 excepted: a frozen group), 1.0 silently
    used the first group's (kohya-ss/sd-scripts#1929). So LoRA+ (optim.b_lr_ratio) and per-group rates cannot
    work with it. AdamW and 8-bit AdamW take a rate per group."""
    if cfg.optim.optimizer != "prodigy":
        return
    rates = [g["lr"] for g in param_groups if g["lr"] != 0]
    if len(set(rates)) <= 1:
        return
    ref = cfg.optim.lr if cfg.optim.lr in rates else rates[0]
    odd = next(g for g in param_groups if g["lr"] not in (0, ref))
    label = odd.get("name", "?").split("+")[0]
    key, value = _rate_key(label, cfg)
    raise UserError(f"{key}: {value} gives {label} the rate {odd['lr']:g} beside {ref:g}, but "
                    "optim.optimizer=prodigy steps every parameter group at one rate (Prodigy shares one step size "
                    "and one rate across groups; prodigyopt refuses different rates, older versions silently use the "
                    "first group's): use optim.optimizer: adamw for LoRA+ and per-group rates, or give every group "
                    "the same rate (0 still freezes one)")


def _rate_key(label: str, cfg) -> tuple[str, str]:
    """The setting behind a group label `<component or ruleN:match>:<part>` (lora/groups.py), and its value."""
    where, _, part = label.rpartition(":")
    o = cfg.optim
    if part == "B" and o.b_lr_ratio != 1:
        return "optim.b_lr_ratio", f"{o.b_lr_ratio:g}"
    if part == "alpha" and o.alpha_lr is not None:
        return "optim.alpha_lr", f"{o.alpha_lr:g}"
    if where.startswith("rule"):
        i = int(where[4:].partition(":")[0])
        rule = o.lr_rules[i]
        return f"optim.lr_rules.{i}", (f"lr {rule.lr:g}" if rule.lr is not None else f"lr_scale {rule.lr_scale:g}")
    if where == "text_encoder_2" and o.text_encoder_2_lr is not None:
        return "optim.text_encoder_2_lr", f"{o.text_encoder_2_lr:g}"
    if where in o.part_lr:
        return f"optim.part_lr.{where}", f"{o.part_lr[where]:g}"
    if where in PARTS and PARTS[where].role == "text_encoder":
        return "optim.text_encoder_lr", f"{cfg.text_encoder_lr:g}"
    return "optim.lr", f"{o.lr:g}"


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
