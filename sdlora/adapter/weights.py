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
from pathlib import Path

import torch

from sdlora.adapter.algebra import balance_factors
from sdlora.adapter.names import COMPONENTS, TEXT_ENCODERS, canonical_name, split_name  # noqa: F401  (re-exported)
from sdlora.errors import UserError
from sdlora.util.atomic import save_safetensors

@dataclass
class ModuleDelta:
    """One module's update. down: (r, in) or (r, in, kh, kw); up: (out, r) or (out, r, 1, 1)."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float = 1.0  # the effective scale contained in the factors (for reports)
    alpha: float | None = None  # the module's alpha at export (learned or fixed), for reports
    trained_rank: int | None = None  # the adapter's rank during training (export can be 2r)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def is_conv(self) -> bool:
        return self.down.dim() == 4

    def delta_weight(self) -> torch.Tensor:
        """Dense ΔW in the base weight's shape: (out, in) or (out, in, kh, kw)."""
        down, up = self.down, self.up
        if not self.is_conv:
            return up @ down
        r, cin, kh, kw = down.shape
        return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], cin, kh, kw)


@dataclass
class AdapterWeights:
    modules: dict[str, ModuleDelta]
    metadata: dict[str, str] = field(default_factory=dict)

    def to(self, dtype: torch.dtype) -> "AdapterWeights":
        """Cast the factors; for a 16-bit dtype each module is first balanced (see `balance_factors`)."""
        mods = {}
        for n, m in self.modules.items():
            down, up = balance_factors(m.down, m.up) if dtype in HALF_DTYPES else (m.down, m.up)
            mods[n] = replace(m, down=down.to(dtype), up=up.to(dtype))  # every other field carried as it is
        return AdapterWeights(mods, dict(self.metadata))


HALF_DTYPES = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------- native layout
def native_prefix(name: str) -> str:
    component, path = split_name(name)
    return f"{component}.text_model.{path}" if component in TEXT_ENCODERS else name


def native_state_dict(adapter: AdapterWeights) -> dict[str, torch.Tensor]:
    sd = {}
    for name, m in adapter.modules.items():
        p = native_prefix(name)
        sd[f"{p}.lora_A.weight"] = m.down
        sd[f"{p}.lora_B.weight"] = m.up
    return sd


def save_native(adapter: AdapterWeights, path: str | Path) -> None:
    meta = dict(adapter.metadata)
    meta["sdlora.format"] = "diffusers"
    meta["sdlora.modules"] = json.dumps(
        {n: {"scale": m.scale, "alpha": m.alpha, "rank": m.trained_rank or m.rank} for n, m in adapter.modules.items()}
    )
    save_safetensors(path, native_state_dict(adapter), metadata=meta)


def from_native_keys(sd: dict[str, torch.Tensor], meta: dict[str, str]) -> AdapterWeights:
    info = json.loads(meta.get("sdlora.modules", "{}"))
    downs, ups = {}, {}
    for key, t in sd.items():
        for suffix, bucket in ((".lora_A.weight", downs), (".lora_B.weight", ups)):
            if key.endswith(suffix):
                stem = key[: -len(suffix)]
                component, _, path = stem.partition(".")
                if component not in COMPONENTS:
                    raise UserError(f"adapter key {key!r}: expected a unet., text_encoder. or text_encoder_2. prefix")
                bucket[canonical_name(component, path)] = t
                break
        else:
            raise UserError(f"adapter key {key!r} is not a LoRA key (expected .lora_A.weight / .lora_B.weight)")
    if set(downs) != set(ups):
        missing = sorted(set(downs) ^ set(ups))[0]
        raise UserError(f"adapter module {missing} has only one of lora_A / lora_B")
    mods = {}
    for n in sorted(downs):
        i = info.get(n, {})
        mods[n] = ModuleDelta(downs[n], ups[n], scale=i.get("scale", 1.0), alpha=i.get("alpha"), trained_rank=i.get("rank"))
    return AdapterWeights(mods, meta)
