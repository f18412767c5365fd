"""The in-memory form of an exported adapter, and its native (diffusers / peft) file layout.

An adapter is a set of per-module low-rank updates `ΔW = up @ down`, with every scale (alpha / r,
learned alpha, rank-stabilised scaling) already in the factors, so any loader reads scale 1: folded into
`up` in memory and in fp32 files; in fp16/bf16 files split evenly between `up` and `down` per rank
component (`balance_factors`), which keeps both factors in the 16-bit normal range.

Module names are canonical and independent of library versions:
  `unet.<module path>`            e.g. unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q
  `text_encoder.<module path>`    e.g. text_encoder.encoder.layers.0.self_attn.q_proj
  `text_encoder_2.<module path>`  SDXL's second text encoder, the same paths
(the `text_model.` level that transformers 4 has and transformers 5 dropped is not part of the name).

Native layout keys: `unet.<path>.lora_A.weight` (down) / `.lora_B.weight` (up) and
`text_encoder.text_model.<path>.lora_A.weight` (and `text_encoder_2.text_model.<path>...`, the prefix
`StableDiffusionXLPipeline.load_lora_weights` reads); diffusers strips `text_model.` where the model has none.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import ClassVar
from pathlib import Path

import torch

from sdlora.adapter.algebra import balance_factors
from sdlora.adapter.names import COMPONENTS, TEXT_ENCODERS, canonical_name, split_name  # noqa: F401  (re-exported)
from sdlora.errors import UserError
from sdlora.util.atomic import save_safetensors

@dataclass
class ModuleDelta:
    """One module's LoRA update ΔW = up @ down. down: (r, in) or (r, in, kh, kw); up: (out, r) or (out, r, 1, 1).

    The record of every adapter kind derives from this one: a kind adds its own tensors as fields (so `replace`
    carries them wherever a record is rebuilt), names them in TENSORS, maps them to file keys in NATIVE_KEYS and
    KOHYA_KEYS (role -> key suffix), and answers `delta_weight`. See `KINDS`."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float = 1.0  # the effective scale contained in the factors (for reports)
    alpha: float | None = None  # the module's alpha at export (learned or fixed), for reports
    trained_rank: int | None = None  # the adapter's rank during training (export can be 2r)

    kind: ClassVar[str] = "lora"
    TENSORS: ClassVar[tuple[str, ...]] = ("down", "up")
    NATIVE_KEYS: ClassVar[dict[str, str]] = {"down": "lora_A.weight", "up": "lora_B.weight"}
    KOHYA_KEYS: ClassVar[dict[str, str]] = {"down": "lora_down.weight", "up": "lora_up.weight"}
    NEEDS_BASE: ClassVar[bool] = False  # whether ΔW depends on the base weight (then `delta_weight(base)` needs it)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def is_conv(self) -> bool:
        return self.down.dim() == 4

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The base weight's shape: (out, in) or (out, in, kh, kw)."""
        return (self.up.shape[0], *self.down.shape[1:])

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the record by role (TENSORS)."""
        return {role: getattr(self, role) for role in self.TENSORS}

    def low_rank_delta(self) -> torch.Tensor:
        """up @ down in the base weight's shape."""
        down, up = self.down, self.up
        if not self.is_conv:
            return up @ down
        r, cin, kh, kw = down.shape
        return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], cin, kh, kw)

    def delta_weight(self, base: torch.Tensor | None = None) -> torch.Tensor:
        """Dense ΔW = W_adapted - W0 in the base weight's shape: (out, in) or (out, in, kh, kw). LoRA's does not
        depend on the base weight `base` (W0); a kind whose update does (NEEDS_BASE) requires it."""
        return self.low_rank_delta()

    def cast(self, dtype: torch.dtype) -> "ModuleDelta":
        """Every tensor in `dtype`; for a 16-bit dtype the factors are first balanced (see `balance_factors`)."""
        down, up = balance_factors(self.down, self.up) if dtype in HALF_DTYPES else (self.down, self.up)
        extra = {r: t.to(dtype) for r, t in self.tensors().items() if r not in ("down", "up")}
        return replace(self, down=down.to(dtype), up=up.to(dtype), **extra)  # every other field carried as it is

    # File shapes: the in-memory tensors are written as they are unless a kind says otherwise.
    def file_tensor(self, role: str, layout: str) -> torch.Tensor:
        return getattr(self, role)

    @classmethod
    def from_file_tensors(cls, tensors: dict[str, torch.Tensor], layout: str, where: str, **info) -> "ModuleDelta":
        """The record from its tensors by role as a file of `layout` holds them; `where` names the module for errors."""
        return cls(**tensors, **info)


@dataclass
class DoRADelta(ModuleDelta):
    """DoRA (Liu et al. 2024): W = m ⊙ V / ‖V‖_row with V = W0 + up @ down, the norm taken per output feature (each
    row of the (out, in·kh·kw) weight: the paper's column norm of its (in, out) matrix, peft's `weight_norm`).
    magnitude: (out,). Native layout: peft's `lora_magnitude_vector`, (out,) for Linear and (1, out, 1, 1) for conv;
    kohya/LyCORIS: `dora_scale`, (out, 1) or (out, 1, 1, 1), LyCORIS' output-axis (`wd_on_out`) layout."""

    magnitude: torch.Tensor | None = None

    kind: ClassVar[str] = "dora"
    TENSORS: ClassVar[tuple[str, ...]] = ("down", "up", "magnitude")
    NATIVE_KEYS: ClassVar[dict[str, str]] = {**ModuleDelta.NATIVE_KEYS, "magnitude": "lora_magnitude_vector"}
    KOHYA_KEYS: ClassVar[dict[str, str]] = {**ModuleDelta.KOHYA_KEYS, "magnitude": "dora_scale"}
    NEEDS_BASE: ClassVar[bool] = True

    def delta_weight(self, base: torch.Tensor | None = None) -> torch.Tensor:
        if base is None:
            raise UserError("a DoRA update depends on the base weight; give the base model (--base)")
        from sdlora.adapter.functional import dora_weight

        w0 = base.detach().to(torch.float64).reshape(self.weight_shape)
        return dora_weight(w0, self.low_rank_delta().double(), self.magnitude.double()) - w0

    def file_tensor(self, role: str, layout: str) -> torch.Tensor:
        if role != "magnitude":
            return getattr(self, role)
        lead = 1 if self.is_conv else 0
        if layout == "kohya":
            return self.magnitude.reshape(-1, 1, *([1] * 2 * lead))
        return self.magnitude.reshape(*([1] * lead), -1, *([1] * 2 * lead))

    @classmethod
    def from_file_tensors(cls, tensors, layout, where, **info):
        m, out = tensors["magnitude"], tensors["up"].shape[0]
        if m.numel() != out or (layout == "kohya" and m.shape[0] != out):
            raise UserError(f"DoRA module {where}: magnitude of shape {tuple(m.shape)} is not one value per output "
                            f"({out}); input-axis DoRA (LyCORIS' default without wd_on_out) is not supported")
        return cls(**{**tensors, "magnitude": m.reshape(out)}, **info)


# Adapter kinds by name (`lora.type`): each a record class; its key suffixes tell its files apart.
KINDS: dict[str, type[ModuleDelta]] = {"lora": ModuleDelta, "dora": DoRADelta}


def kind_of(suffixes: set[str], layout: str, where: str) -> type[ModuleDelta]:
    """The record class whose key suffixes in `layout` are exactly `suffixes`; a UserError naming the module else."""
    for cls in KINDS.values():
        keys = cls.NATIVE_KEYS if layout == "diffusers" else cls.KOHYA_KEYS
        if set(keys.values()) == suffixes:
            return cls
    raise UserError(f"adapter module {where} has keys {', '.join(sorted(suffixes))}: not a whole "
                    f"{' / '.join(KINDS)} module (is a key missing?)")


@dataclass
class AdapterWeights:
    modules: dict[str, ModuleDelta]
    metadata: dict[str, str] = field(default_factory=dict)

    def to(self, dtype: torch.dtype) -> "AdapterWeights":
        """Cast every module's tensors; for a 16-bit dtype the factors are first balanced (see `balance_factors`)."""
        return AdapterWeights({n: m.cast(dtype) for n, m in self.modules.items()}, dict(self.metadata))

    def kinds(self) -> set[str]:
        return {m.kind for m in self.modules.values()}

    def require_low_rank(self, what: str) -> None:
        """A UserError when a module is not plain LoRA: `what` works on the factors up @ down alone."""
        other = sorted(self.kinds() - {"lora"})
        if other:
            raise UserError(f"{what} works on plain LoRA adapters; this one holds {', '.join(other)} modules")


HALF_DTYPES = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------- native layout
def native_prefix(name: str) -> str:
    component, path = split_name(name)
    return f"{component}.text_model.{path}" if component in TEXT_ENCODERS else name


def native_state_dict(adapter: AdapterWeights) -> dict[str, torch.Tensor]:
    sd = {}
    for name, m in adapter.modules.items():
        p = native_prefix(name)
        for role, suffix in m.NATIVE_KEYS.items():
            sd[f"{p}.{suffix}"] = m.file_tensor(role, "diffusers")
    return sd


def save_native(adapter: AdapterWeights, path: str | Path) -> None:
    meta = dict(adapter.metadata)
    meta["sdlora.format"] = "diffusers"
    meta["sdlora.modules"] = json.dumps(
        {n: {"scale": m.scale, "alpha": m.alpha, "rank": m.trained_rank or m.rank} for n, m in adapter.modules.items()}
    )
    save_safetensors(path, native_state_dict(adapter), metadata=meta)


NATIVE_SUFFIXES = sorted({s for cls in KINDS.values() for s in cls.NATIVE_KEYS.values()}, key=len, reverse=True)


def from_native_keys(sd: dict[str, torch.Tensor], meta: dict[str, str]) -> AdapterWeights:
    info = json.loads(meta.get("sdlora.modules", "{}"))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        suffix = next((x for x in NATIVE_SUFFIXES if key.endswith("." + x)), None)
        if suffix is None:
            raise UserError(f"adapter key {key!r} is not an adapter key (expected .lora_A.weight / .lora_B.weight"
                            " / .lora_magnitude_vector)")
        stem = key[: -len(suffix) - 1]
        component, _, path = stem.partition(".")
        if component not in COMPONENTS:
            raise UserError(f"adapter key {key!r}: expected a unet., text_encoder. or text_encoder_2. prefix")
        parts.setdefault(canonical_name(component, path), {})[suffix] = t
    mods = {}
    for n in sorted(parts):
        if set(parts[n]) == {"lora_A.weight"} or set(parts[n]) == {"lora_B.weight"}:
            raise UserError(f"adapter module {n} has only one of lora_A / lora_B")
        cls = kind_of(set(parts[n]), "diffusers", n)
        i = info.get(n, {})
        tensors = {role: parts[n][suffix] for role, suffix in cls.NATIVE_KEYS.items()}
        mods[n] = cls.from_file_tensors(tensors, "diffusers", n, scale=i.get("scale", 1.0), alpha=i.get("alpha"),
                                        trained_rank=i.get("rank"))
    return AdapterWeights(mods, meta)
