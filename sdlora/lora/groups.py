"""Optimiser parameter groups: per-layer learning rates from ordered rules, LoRA+ B ratio, alpha rate.

A rule's `match` is a named group of the model family (model/families.py: text_encoder, text_encoder.layers.N,
unet, unet.down, unet.mid, unet.up, unet.down.N, unet.up.N for SD 1.x/2.x; SDXL adds text_encoder_2,
text_encoder_2.layers.N and its original block names unet.input / unet.middle / unet.output (.N)) or a regular
expression searched in the canonical module name.
The first matching rule wins. One optimiser group per distinct (rate, weight decay); each group's name
says which rates it carries, so logs read `lr/unet.up:B`.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field

from torch import nn

from sdlora.errors import UserError
from sdlora.lora.layers import AdapterLayer
from sdlora.model.families import ModelFamily


def rule_pattern(match: str, family: ModelFamily) -> re.Pattern:
    """A rule's `match` as a regular expression over canonical module names: the family's named block group, or
    the text itself as a regular expression."""
    named = family.named_group(match)
    if named is not None:
        return named
    try:
        return re.compile(match)
    except re.error as e:
        raise UserError(f"optim.lr_rules: {match!r} is neither a named group nor a valid regular expression ({e})") from None


@dataclass
class Assignment:
    """Which rule (index or None) and rate each module got."""

    rule: int | None
    lr: float


@dataclass
class ParamGroups:
    groups: list[dict]  # torch optimiser param groups, each with a 'name'
    assignment: dict[str, Assignment] = field(default_factory=dict)

    def rates(self) -> dict[str, float]:
        return {g["name"]: g["lr"] for g in self.groups}


def component_of(name: str) -> str:
    """The part a canonical module name belongs to (`unet`, `text_encoder`, SDXL's `text_encoder_2`)."""
    return name.partition(".")[0]


def check_part_rates(cfg, family: ModelFamily) -> None:
    """A UserError naming an optim.part_lr key that is none of `family`'s adaptable parts."""
    for name in cfg.part_rates():
        if name not in family.adaptable_parts:
            raise UserError(f"optim.part_lr.{name}: {family.title} has no part {name!r} that carries adapters "
                            f"(its parts: {', '.join(family.adaptable_parts)})")


def assign_rates(layers: dict[str, AdapterLayer], cfg, family: ModelFamily) -> dict[str, Assignment]:
    check_part_rates(cfg, family)
    rules = [(rule_pattern(r.match, family), r) for r in cfg.optim.lr_rules]
    used = set()
    out = {}
    for name in layers:
        base = cfg.part_lr(family.part(component_of(name)))
        out[name] = Assignment(None, base)
        for i, (pattern, rule) in enumerate(rules):
            if pattern.search(name):
                if rule.preset is not None:
                    lr = PRESETS[rule.preset](layers[name], rule.lr if rule.lr is not None else base, cfg, i)
                else:
                    lr = rule.lr if rule.lr is not None else base * rule.lr_scale
                out[name] = Assignment(i, lr)
                used.add(i)
                break
    for i, (_, rule) in enumerate(rules):
        if i not in used:
            raise UserError(f"optim.lr_rules.{i}: rule {rule.match!r} matches no adapted module")
    return out


def _label(name: str, rule: int | None, cfg) -> str:
    if rule is not None:
        return f"rule{rule}:{cfg.optim.lr_rules[rule].match}"
    return component_of(name)


def build_param_groups(layers: dict[str, AdapterLayer], cfg, family: ModelFamily) -> ParamGroups:
    """Group every trainable adapter parameter by its rate (role_rate): A at the module's rate, B at ratio x, alpha at
    alpha_lr.
    Named rule groups (`unet.up.1`) are the model family's block groups."""
    assignment = assign_rates(layers, cfg, family)
    buckets: "OrderedDict[tuple, dict]" = OrderedDict()
    for name, layer in layers.items():
        a = assignment[name]
        label = _label(name, a.rule, cfg)
        for role, p in layer.trainable_roles():
            lr, wd, part = role_rate(role, a.lr, cfg)
            key = (lr, wd, part == "alpha")
            g = buckets.setdefault(key, {"params": [], "lr": lr, "weight_decay": wd, "labels": OrderedDict()})
            g["params"].append(p)
            g["labels"][f"{label}:{part}"] = None
    groups, seen = [], set()
    for g in buckets.values():
        labels = list(g.pop("labels"))
        name = labels[0] if len(labels) == 1 else "+".join(labels)
        name = next(f"{name}#{n}" for n in range(1, len(buckets) + 2) if f"{name}#{n}" not in seen) if name in seen else name
        seen.add(name)  # a preset's rule gives one label several rates: `rule0:unet:A`, `rule0:unet:A#1`, ...
        groups.append({**g, "name": name})
    return ParamGroups(groups, assignment)


# How each parameter role trains: (rate, weight decay, the label part logs show, e.g. `lr/unet.up:B`).
def role_rate(role: str, module_lr: float, cfg) -> tuple[float, float, str]:
    if role == "down":
        return module_lr, cfg.optim.weight_decay, "A"
    if role == "up":
        return module_lr * cfg.optim.b_lr_ratio, cfg.optim.weight_decay, "B"
    if role == "scale":
        return (module_lr if cfg.optim.alpha_lr is None else cfg.optim.alpha_lr), 0.0, "alpha"
    if role == "magnitude":  # DoRA's m: the module's rate; no decay (it would pull every weight towards 0)
        return module_lr, 0.0, "m"
    if role == "factor":  # a full factor, neither side of a low-rank pair (LoKr's w1, w2): the module's rate
        return module_lr, cfg.optim.weight_decay, "W"
    raise ValueError(f"unknown parameter role {role!r}")


def match_full_finetune(layer: AdapterLayer, full_lr: float, cfg, rule: int) -> float:
    """The module rate (A's; B's is optim.b_lr_ratio times it) at which the first Adam step moves the module's W as
    much as a full fine-tune's first step at `full_lr` (docs/lora.md, 'A rate rule from the full fine-tune'):

        lr = full_lr · sqrt(out · k) / (|s| · sqrt(ρ² · out · ‖A‖² + [A trained] · k · ‖B‖²))

    out, k: the weight's output and input size (k = in·kh·kw for a conv), s the scale alpha/r, ρ = optim.b_lr_ratio,
    ‖·‖ the Frobenius norm of the factors as initialised. Rounded to 2 significant digits, so modules of one shape
    share an optimiser group. Adam's first step moves every entry by its rate (sign(g)), hence no gradient enters;
    the cross terms' expectation is taken as zero. LoRA+'s observation (Hayou et al. 2024) that B and A want different
    rates is what ρ carries. A UserError for kinds without a plain (A, B) pair."""
    import math

    if layer.adapter_kind != "lora":
        raise UserError(f"optim.lr_rules.{rule}: preset match_full_finetune applies to lora.type lora, not "
                        f"{layer.adapter_kind} (its first step is not s·(ΔB·A + B·ΔA))")
    a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    out, k = b.shape[0], a[0].numel()
    rho = cfg.optim.b_lr_ratio
    moved = rho ** 2 * out * float(a.pow(2).sum()) + (k * float(b.pow(2).sum()) if layer.lora_A.requires_grad else 0.0)
    s = abs(layer.scale_value())
    if moved == 0 or s == 0:
        raise UserError(f"optim.lr_rules.{rule}: preset match_full_finetune: the first step of this module does not "
                        "move W (A and B both zero, or alpha 0)")
    lr = full_lr * math.sqrt(out * k) / (s * math.sqrt(moved))
    return float(f"{lr:.2g}")


PRESETS = {"match_full_finetune": match_full_finetune}  # optim.lr_rules' `preset` -> the module's rate


def trainable_count(layers: dict[str, AdapterLayer]) -> int:
    return sum(p.numel() for layer in layers.values() for p in layer.trainable_parameters().values())


def freeze_check(*models: nn.Module) -> list[str]:
    """Names of parameters that require grad but are not adapter parameters (should be empty)."""
    from sdlora.lora.layers import lora_layers

    bad = []
    for model in models:
        ours = {id(p) for _, layer in lora_layers(model) for p in layer.trainable_parameters().values()}
        for n, p in model.named_parameters():
            if p.requires_grad and id(p) not in ours:
                bad.append(n)
    return bad
