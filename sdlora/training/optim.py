"""Optimisers and learning-rate schedules."""

from __future__ import annotations

import math

import torch

from sdlora.adapter.names import PARTS
from sdlora.errors import UserError


# Optimisers from optional packages: optim.optimizer -> (module, class, pip extra). One package (pytorch-optimizer,
# kept up by kozistr) serves Lion (Chen et al. 2023), CAME (Luo et al. 2023) and schedule-free AdamW (Defazio et al.
# 2024); Adafactor (Shazeer & Stern 2018) is transformers' own, which sdlora already needs.
OPTIONAL_OPTIMIZERS = {"lion": ("pytorch_optimizer", "Lion", "optimizers"),
                       "came": ("pytorch_optimizer", "CAME", "optimizers"),
                       "adamw_schedulefree": ("pytorch_optimizer", "ScheduleFreeAdamW", "optimizers"),
                       "adamw8bit": ("bitsandbytes.optim", "AdamW8bit", "bnb"),
                       "prodigy": ("prodigyopt", "Prodigy", "prodigy")}
PACKAGES = {"pytorch_optimizer": "pytorch-optimizer", "bitsandbytes.optim": "bitsandbytes", "prodigyopt": "prodigyopt"}
DEFAULT_BETAS = {"lion": (0.9, 0.99), "came": (0.9, 0.999, 0.9999)}  # the papers' (and packages') defaults


def optimizer_class(name: str):
    """The class of an optional optimiser; a missing package is a one-line UserError naming the extra."""
    import importlib

    module, cls, extra = OPTIONAL_OPTIMIZERS[name]
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError:
        raise UserError(f"optim.optimizer: {name} needs {PACKAGES[module]} (pip install 'sdlora[{extra}]')") from None


def _betas(o) -> tuple:
    """optim.betas as set; when left at AdamW's default, the optimiser's own (Lion 0.9/0.99; CAME's third beta)."""
    if "betas" not in o.model_fields_set and o.optimizer in DEFAULT_BETAS:
        return DEFAULT_BETAS[o.optimizer]
    return tuple(o.betas) + ((DEFAULT_BETAS["came"][2],) if o.optimizer == "came" else ())


def make_optimizer(param_groups: list[dict], cfg) -> torch.optim.Optimizer:
    o = cfg.optim
    check_rates(param_groups, cfg)
    groups = [{k: v for k, v in g.items()} for g in param_groups]
    common = {"lr": o.lr, "weight_decay": o.weight_decay}
    if o.optimizer == "adamw":
        fast = {"fused": True} if _all_on_cuda(groups) else {"foreach": True}
        return torch.optim.AdamW(groups, betas=o.betas, eps=o.eps, **common, **fast)
    if o.optimizer == "adafactor":  # kohya's LoRA recipe: a given rate, no relative step, no parameter scaling
        from transformers.optimization import Adafactor

        return Adafactor(groups, scale_parameter=False, relative_step=False, warmup_init=False, **common)
    cls = optimizer_class(o.optimizer)
    if o.optimizer == "came":
        return cls(groups, betas=_betas(o), **common)
    if o.optimizer == "lion":
        return cls(groups, betas=_betas(o), **common)
    if o.optimizer == "adamw_schedulefree":  # its warm-up is its own (the schedule stays constant)
        return cls(groups, betas=tuple(o.betas), eps=o.eps, warmup_steps=o.warmup_steps, **common)
    return cls(groups, betas=o.betas, eps=o.eps, **common)  # adamw8bit, prodigy


def use_training_weights(optimizer) -> None:
    """Schedule-free AdamW keeps two points: the one gradients are taken at (train mode) and the average that is
    evaluated, sampled, checkpointed and exported (eval mode). The loop switches to train mode before a step's
    forward passes and back after its update (`use_average_weights`), so everything between steps sees the
    average, and a resumed run makes the same switches as the uninterrupted one. Other optimisers: nothing."""
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds it
    if callable(getattr(inner, "train", None)):
        inner.train()


def use_average_weights(optimizer) -> None:
    inner = getattr(optimizer, "optimizer", optimizer)
    if callable(getattr(inner, "eval", None)):
        inner.eval()


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
    warmup = 0 if cfg.optim.optimizer == "adamw_schedulefree" else cfg.optim.warmup_steps  # it warms up itself
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim.scheduler, warmup, cfg.train.max_steps))
