"""Putting LoRA layers into the denoiser and the text encoders, by module-name patterns.

A target is a name ending (`to_q` matches `...attn1.to_q`; `to_out.0` matches `...to_out.0`) or a
regular expression prefixed with `re:` searched in the module's path. Every target must match at
least one module, or the config is wrong.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from sdlora.adapter.weights import canonical_name
from sdlora.errors import UserError
from sdlora.lora.dora import DoRAConv2d, DoRALinear
from sdlora.lora.layers import AdapterLayer, LoRAConv2d, LoRALinear
from sdlora.lora.lycoris import LoHaLayer, LoKrLayer


@dataclass
class LayerSpec:
    rank: int
    alpha: float
    rank_key: str = "lora.rank"  # the config key the rank came from, for messages
    start: object = None  # lora.init_from: the file's record (adapter/records.py; every scale folded in)


def _matches(target: str, path: str) -> bool:
    if target.startswith("re:"):
        return re.search(target[3:], path) is not None
    return path == target or path.endswith("." + target)


def find_targets(model: nn.Module, targets: list[str], kinds: tuple[type, ...], *, key: str) -> list[str]:
    """Module paths of `kinds` matching any target; a target matching nothing is a UserError naming `key`."""
    found, used = [], set()
    for path, module in model.named_modules():
        if not isinstance(module, kinds) or isinstance(module, AdapterLayer) or ".base" in f".{path}":
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


def inject(model: nn.Module, component: str, specs: dict[str, LayerSpec], lora_cfg, seed: int) -> dict[str, AdapterLayer]:
    """Wrap each module in `specs` (path -> rank/alpha) with an adapter layer of lora.type; returns canonical name ->
    layer.

    Each module's init draws from its own generator seeded by (seed, canonical name), so a module's
    initial factors do not depend on which other modules are adapted.
    """
    layers = {}
    for path, spec in specs.items():
        base = model.get_submodule(path)
        name = canonical_name(component, path)
        gen = torch.Generator().manual_seed(_name_seed(seed, name))
        layer = layer_class(lora_cfg.type, base).build(base, spec, lora_cfg, gen)
        if spec.start is not None:
            layer.load_record(spec.start, name)
        _replace(model, path, layer)
        layers[name] = layer
    return layers


# (lora.type, base module type) -> layer class. A new adapter kind adds its rows here; nothing else asks which
# class a layer is.
LAYER_CLASSES: dict[tuple[str, type], type[AdapterLayer]] = {
    ("lora", nn.Linear): LoRALinear, ("lora", nn.Conv2d): LoRAConv2d,
    ("dora", nn.Linear): DoRALinear, ("dora", nn.Conv2d): DoRAConv2d,
    ("loha", nn.Linear): LoHaLayer, ("loha", nn.Conv2d): LoHaLayer,
    ("lokr", nn.Linear): LoKrLayer, ("lokr", nn.Conv2d): LoKrLayer,
}


def layer_class(kind: str, base: nn.Module) -> type[AdapterLayer]:
    for (k, module_type), cls in LAYER_CLASSES.items():
        if k == kind and isinstance(base, module_type):
            return cls
    raise UserError(f"lora.type {kind!r} cannot adapt a {type(base).__name__} module")


def _name_seed(seed: int, name: str) -> int:
    import zlib

    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def plan_denoiser(denoiser: nn.Module, lora_cfg, targets: list[str] | None = None) -> dict[str, LayerSpec]:
    """`targets`: the family's reading of lora.unet_targets (`ModelFamily.lora_targets`); None: the key itself."""
    targets = lora_cfg.unet_targets if targets is None else targets
    specs = {p: LayerSpec(lora_cfg.rank, lora_cfg.alpha)
             for p in find_targets(denoiser, targets, (nn.Linear,), key="lora.unet_targets")}
    if lora_cfg.conv:
        rank = lora_cfg.conv_rank or lora_cfg.rank
        alpha = lora_cfg.alpha if lora_cfg.conv_alpha is None else lora_cfg.conv_alpha
        # proj_in/proj_out are 1x1 convs in SD 1.x and Linear in SD 2.x: accept both kinds.
        for p in find_targets(denoiser, lora_cfg.conv_targets, (nn.Conv2d, nn.Linear), key="lora.conv_targets"):
            specs.setdefault(p, LayerSpec(rank, alpha, "lora.conv_rank" if lora_cfg.conv_rank else "lora.rank"))
    return specs


def plan_text_encoder(text_encoder: nn.Module, lora_cfg, targets: list[str] | None = None) -> dict[str, LayerSpec]:
    targets = lora_cfg.text_encoder_targets if targets is None else targets
    return {p: LayerSpec(lora_cfg.rank, lora_cfg.alpha)
            for p in find_targets(text_encoder, targets, (nn.Linear,), key="lora.text_encoder_targets")}


def inject_all(models: dict[str, nn.Module], cfg, family) -> dict[str, AdapterLayer]:
    """Freeze the models and inject LoRA per the config; returns every layer by canonical name. `models`: the
    family's adaptable parts by name (`Components.adaptable()`): the denoiser is adapted with lora.unet_targets
    (and conv_targets), each trained text encoder (`ModelFamily.trained_text_encoders`: those whose part carries
    LoRA, or text_encoder.train_parts) with lora.text_encoder_targets; a part's own default targets where the config
    leaves the key unset (`ModelFamily.lora_targets`: SD3's attention of both streams, T5's q, k, v, o)."""
    denoiser = family.denoiser.name
    adapted = [denoiser, *family.trained_text_encoders(cfg)]
    missing = [name for name in adapted if name not in models]
    if missing:
        raise ValueError(f"inject_all: adapting {family.title} needs the models {', '.join(missing)}")
    for name in family.adaptable_parts:
        if name in models:
            models[name].requires_grad_(False)
    plans = {denoiser: (models[denoiser], plan_denoiser(models[denoiser], cfg.lora,
                                                        family.lora_targets(family.denoiser, cfg.lora)))}
    for name in adapted[1:]:
        plans[name] = (models[name], plan_text_encoder(models[name], cfg.lora,
                                                       family.lora_targets(family.part(name), cfg.lora)))
    if cfg.lora.init_from:
        plan_from_adapter(plans, cfg.lora.init_from, cfg)
    if cfg.lora.init_alphas_from:
        # Alphas are set before the layers are built: offset inits fold s0 = alpha0 / r into the base.
        apply_previous_alphas({c: specs for c, (_, specs) in plans.items()}, cfg.lora.init_alphas_from)
    for component, (model, specs) in plans.items():
        check_ranks(model, component, specs, cfg.lora.init)
    layers = {}
    for component, (model, specs) in plans.items():
        layers.update(inject(model, component, specs, cfg.lora, cfg.train.seed))
    return layers


def check_ranks(model: nn.Module, component: str, specs: dict[str, LayerSpec], init: str) -> None:
    """Every planned layer's rank fits its init scheme (before any layer is built, so --dry-run catches it too)."""
    from sdlora.lora.init import max_rank

    for path, spec in specs.items():
        if spec.start is not None:  # built with the zero init, then given the file's factors: any rank fits
            continue
        weight = model.get_submodule(path).weight
        out, k = weight.shape[0], weight[0].numel()
        limit = max_rank(init, out, k)
        if limit is not None and spec.rank > limit:
            shape = f"input width {k}" if init in ("orthogonal", "orthonormal") else f"weight {out} x {k}"
            rule = {"orthogonal": "2 x input width + 1", "orthonormal": "the input width"}.get(init, "min(out, in)")
            raise UserError(f"{spec.rank_key}: {spec.rank} is too large for lora.init={init} at "
                            f"{canonical_name(component, path)} ({shape}); the largest rank it allows there is "
                            f"{limit} ({rule}); lower the rank or choose another lora.init")


def apply_previous_alphas(plans: dict[str, dict[str, LayerSpec]], path: str) -> None:
    """Start each module's alpha from the alphas an earlier sdlora adapter recorded, module by module."""
    from sdlora.adapter.io import load_adapter

    previous = load_adapter(path).modules
    wanted = {canonical_name(c, p): spec for c, specs in plans.items() for p, spec in specs.items()}
    missing = [n for n in wanted if n not in previous or previous[n].alpha is None]
    if missing:
        raise UserError(f"lora.init_alphas_from: {path} has no alpha for module {missing[0]}"
                        f" ({len(missing)} of {len(wanted)} modules missing)")
    zero = [n for n in wanted if float(previous[n].alpha) == 0]
    if zero:
        raise UserError(f"lora.init_alphas_from: {path} has alpha 0 for module {zero[0]} ({len(zero)} modules): "
                        "a zero scale trains nothing")
    for n, spec in wanted.items():
        spec.alpha = float(previous[n].alpha)


def plan_from_adapter(plans: dict, path: str, cfg) -> None:
    """lora.init_from: every module of the adapter file joins the plan with the file's rank, alpha and factors
    (a module the targets also chose takes the file's); modules the targets add and the file lacks start fresh."""
    from sdlora.adapter.algebra import find_module
    from sdlora.adapter.io import load_adapter
    from sdlora.adapter.names import split_name

    adapter = load_adapter(path)
    for name, m in adapter.modules.items():
        if m.kind != cfg.lora.type:  # continuing in another kind would drop (or invent) tensors
            raise UserError(f"lora.init_from: {path} holds {m.kind} modules ({name}); set lora.type: {m.kind}")
        component, module_path = split_name(name)
        if component not in plans:
            raise UserError(f"lora.init_from: {path} adapts the text encoder ({name}); set text_encoder.train: true "
                            "to continue it")
        model, specs = plans[component]
        base = find_module(model, name, where="the model (lora.init_from: an adapter for another base model?)")
        path_in_model = next(p for p, mod in model.named_modules() if mod is base)
        if base.weight.numel() != math.prod(m.weight_shape):
            raise UserError(f"lora.init_from: module {name} of {path} has shape {tuple(m.weight_shape)}; "
                            f"the model's weight is {tuple(base.weight.shape)}")
        rank = m.rank
        # The file's alpha where it describes these factors (an sdlora file exported at 2r records alpha for r);
        # otherwise the alpha that makes the scale 1. Either way the factors give the file's ΔW exactly.
        denominator = rank if cfg.lora.scaling == "standard" else math.sqrt(rank)
        alpha = m.alpha if m.alpha and (m.trained_rank in (None, rank)) else denominator
        specs[path_in_model] = LayerSpec(rank, float(alpha), "lora.init_from", start=m)
