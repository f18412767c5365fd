"""Putting LoRA layers into the UNet and the text encoder, by module-name patterns.

A target is a name ending (`to_q` matches `...attn1.to_q`; `to_out.0` matches `...to_out.0`) or a
regular expression prefixed with `re:` searched in the module's path. Every target must match at
least one module, or the config is wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..adapter import canonical_name
from ..errors import UserError
from .layers import LoRAConv2d, LoRALayer, LoRALinear


@dataclass
class LayerSpec:
    rank: int
    alpha: float


def _matches(target: str, path: str) -> bool:
    if target.startswith("re:"):
        return re.search(target[3:], path) is not None
    return path == target or path.endswith("." + target)


def find_targets(model: nn.Module, targets: list[str], kinds: tuple[type, ...], *, key: str) -> list[str]:
    """Module paths of `kinds` matching any target; a target matching nothing is a UserError naming `key`."""
    found, used = [], set()
    for path, module in model.named_modules():
        if not isinstance(module, kinds) or isinstance(module, LoRALayer) or ".base" in f".{path}":
            continue
        for t in targets:
            if _matches(t, path):
                found.append(path)
                used.add(t)
                break
    unused = [t for t in targets if t not in used]
    if unused:
        allowed = "/".join(k.__name__ for k in kinds)
        raise UserError(f"{key}: target {unused[0]!r} matches no {allowed} module")
    return found


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def inject(model: nn.Module, component: str, specs: dict[str, LayerSpec], lora_cfg, seed: int) -> dict[str, LoRALayer]:
    """Wrap each module in `specs` (path -> rank/alpha) with a LoRA layer; returns canonical name -> layer.

    Each module's init draws from its own generator seeded by (seed, canonical name), so a module's
    initial factors do not depend on which other modules are adapted.
    """
    layers = {}
    for path, spec in specs.items():
        base = model.get_submodule(path)
        name = canonical_name(component, path)
        gen = torch.Generator().manual_seed(_name_seed(seed, name))
        cls = LoRAConv2d if isinstance(base, nn.Conv2d) else LoRALinear
        layer = cls(base, spec.rank, spec.alpha, scaling=lora_cfg.scaling, init=lora_cfg.init,
                    learnable_alpha=lora_cfg.learnable_alpha, train_a=lora_cfg.train_a, generator=gen)
        _replace(model, path, layer)
        layers[name] = layer
    return layers


def _name_seed(seed: int, name: str) -> int:
    import zlib

    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def plan_unet(unet: nn.Module, lora_cfg) -> dict[str, LayerSpec]:
    specs = {p: LayerSpec(lora_cfg.rank, lora_cfg.alpha)
             for p in find_targets(unet, lora_cfg.unet_targets, (nn.Linear,), key="lora.unet_targets")}
    if lora_cfg.conv:
        rank = lora_cfg.conv_rank or lora_cfg.rank
        alpha = lora_cfg.alpha if lora_cfg.conv_alpha is None else lora_cfg.conv_alpha
        # proj_in/proj_out are 1x1 convs in SD 1.x and Linear in SD 2.x: accept both kinds.
        for p in find_targets(unet, lora_cfg.conv_targets, (nn.Conv2d, nn.Linear), key="lora.conv_targets"):
            specs.setdefault(p, LayerSpec(rank, alpha))
    return specs


def plan_text_encoder(text_encoder: nn.Module, lora_cfg) -> dict[str, LayerSpec]:
    return {p: LayerSpec(lora_cfg.rank, lora_cfg.alpha)
            for p in find_targets(text_encoder, lora_cfg.text_encoder_targets, (nn.Linear,), key="lora.text_encoder_targets")}


def inject_all(unet: nn.Module, text_encoder: nn.Module, cfg) -> dict[str, LoRALayer]:
    """Freeze both models and inject LoRA per the config; returns every layer by canonical name."""
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    plans = {"unet": (unet, plan_unet(unet, cfg.lora))}
    if cfg.text_encoder.train:
        plans["text_encoder"] = (text_encoder, plan_text_encoder(text_encoder, cfg.lora))
    if cfg.lora.init_alphas_from:
        # Alphas are set before the layers are built: offset inits fold s0 = alpha0 / r into the base.
        apply_previous_alphas({c: specs for c, (_, specs) in plans.items()}, cfg.lora.init_alphas_from)
    layers = {}
    for component, (model, specs) in plans.items():
        layers.update(inject(model, component, specs, cfg.lora, cfg.train.seed))
    return layers


def apply_previous_alphas(plans: dict[str, dict[str, LayerSpec]], path: str) -> None:
    """Start each module's alpha from the alphas an earlier sdlora adapter recorded, module by module."""
    from ..adapter import load_adapter

    previous = load_adapter(path).modules
    wanted = {canonical_name(c, p): spec for c, specs in plans.items() for p, spec in specs.items()}
    missing = [n for n in wanted if n not in previous or previous[n].alpha is None]
    if missing:
        raise UserError(f"lora.init_alphas_from: {path} has no alpha for module {missing[0]}"
                        f" ({len(missing)} of {len(wanted)} modules missing)")
    for n, spec in wanted.items():
        spec.alpha = float(previous[n].alpha)
