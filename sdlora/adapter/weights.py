"""The in-memory form of an exported adapter, and its native (diffusers / peft) file layout.

An adapter is a set of per-module records, one class per adapter kind (`KINDS`: LoRA's `ΔW = up @ down`, DoRA,
LoHa, LoKr; adapter/records.py and adapter/lycoris.py), with every scale (alpha / r, learned alpha, rank-stabilised
scaling) already in the tensors, so any loader reads scale 1: folded into one factor in memory and in fp32 files;
in fp16/bf16 files spread evenly over the factors (`balance_factors`), which keeps them in the 16-bit normal range.

Module names are canonical and independent of library versions (adapter/names.py): `<part>.<module path>`, e.g.
  `unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`, `text_encoder.encoder.layers.0.self_attn.q_proj`,
  `text_encoder_2.<module path>` (SDXL's second text encoder, the same paths)
(a part's model level, the `text_model.` that transformers 4 has and transformers 5 dropped, is not part of the name).

Native layout keys: `<part>.<model level><path>.lora_A.weight` (down) / `.lora_B.weight` (up):
`unet.<path>...`, `text_encoder.text_model.<path>...` (and `text_encoder_2.text_model.<path>...`, the prefix
`StableDiffusionXLPipeline.load_lora_weights` reads); diffusers strips `text_model.` where the model has none.
Other kinds put their own suffixes (each record's NATIVE_KEYS: peft's names) after the same prefixes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdlora.adapter.lycoris import LoHaDelta, LoKrDelta
from sdlora.adapter.names import COMPONENTS, TEXT_ENCODERS, canonical_name, model_level, split_name  # noqa: F401
from sdlora.adapter.records import HALF_DTYPES, AdapterDelta, DoRADelta, ModuleDelta  # noqa: F401  (re-exported)
from sdlora.errors import UserError
from sdlora.util.atomic import save_safetensors

# Adapter kinds by name (`lora.type`): each a record class; its key suffixes tell its files apart.
KINDS: dict[str, type[AdapterDelta]] = {"lora": ModuleDelta, "dora": DoRADelta, "loha": LoHaDelta, "lokr": LoKrDelta}


def kind_of(suffixes: set[str], layout: str, where: str) -> type[AdapterDelta]:
    """The record class whose key suffixes in `layout` are exactly `suffixes`; a UserError naming the module else."""
    for cls in KINDS.values():
        if cls.accepts(suffixes, layout):
            return cls
    raise UserError(f"adapter module {where} has keys {', '.join(sorted(suffixes))}: not a whole "
                    f"{' / '.join(KINDS)} module (is a key missing?)")


@dataclass
class AdapterWeights:
    modules: dict[str, AdapterDelta]
    metadata: dict[str, str] = field(default_factory=dict)

    def to(self, dtype: torch.dtype) -> "AdapterWeights":
        """Cast every module's tensors; for a 16-bit dtype the factors are first balanced (records' `balanced`)."""
        return AdapterWeights({n: m.cast(dtype) for n, m in self.modules.items()}, dict(self.metadata))

    def kinds(self) -> set[str]:
        return {m.kind for m in self.modules.values()}

    def require_low_rank(self, what: str) -> None:
        """A UserError when a module is not plain LoRA: `what` works on the factors up @ down alone."""
        other = sorted(self.kinds() - {"lora"})
        if other:
            raise UserError(f"{what} works on plain LoRA adapters; this one holds {', '.join(other)} modules")

    def require_diffusers_reads(self) -> None:
        """A UserError when diffusers' load_lora_weights cannot read the native layout of a module's kind."""
        other = sorted({m.kind for m in self.modules.values() if not m.DIFFUSERS_READS})
        if other:
            raise UserError(f"the diffusers layout: StableDiffusionPipeline.load_lora_weights does not read {', '.join(other)} "
                            "adapters (diffusers 0.42); write the kohya layout (AUTOMATIC1111, ComfyUI, LyCORIS) or a "
                            "merged model (merged-diffusers, merged-single-file)")


# --------------------------------------------------------------------------------------- native layout
def native_prefix(name: str) -> str:
    """The key prefix of a module in the native layout: the part, its model level (`text_model.`), the path."""
    component, path = split_name(name)
    return f"{component}.{model_level(component)}{path}"


def native_state_dict(adapter: AdapterWeights) -> dict[str, torch.Tensor]:
    sd = {}
    for name, m in adapter.modules.items():
        p, component = native_prefix(name), split_name(name)[0]
        for role in m.tensors():
            sd[f"{p}.{m.native_key(role, component)}"] = m.file_tensor(role, "diffusers")
    return sd


def save_native(adapter: AdapterWeights, path: str | Path) -> None:
    meta = dict(adapter.metadata)
    meta["sdlora.format"] = "diffusers"
    meta["sdlora.modules"] = json.dumps({n: m.info() for n, m in adapter.modules.items()})
    save_safetensors(path, native_state_dict(adapter), metadata=meta)


NATIVE_ALIASES = {a: s for cls in KINDS.values() for a, s in cls.NATIVE_ALIASES.items()}
NATIVE_SUFFIXES = sorted({s for cls in KINDS.values() for s in cls.NATIVE_KEYS.values()} | set(NATIVE_ALIASES), key=len,
                         reverse=True)


def from_native_keys(sd: dict[str, torch.Tensor], meta: dict[str, str]) -> AdapterWeights:
    info = json.loads(meta.get("sdlora.modules", "{}"))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        suffix = next((x for x in NATIVE_SUFFIXES if key.endswith("." + x)), None)
        if suffix is None:
            raise UserError(f"adapter key {key!r} is not an adapter key (expected an ending of "
                            f"{' / '.join(NATIVE_SUFFIXES[::-1])})")
        stem = key[: -len(suffix) - 1]
        suffix = NATIVE_ALIASES.get(suffix, suffix)
        component, _, path = stem.partition(".")
        if component not in COMPONENTS:
            raise UserError(f"adapter key {key!r}: expected a {', '.join(c + '.' for c in COMPONENTS)} prefix")
        parts.setdefault(canonical_name(component, path), {})[suffix] = t
    mods = {}
    for n in sorted(parts):
        if set(parts[n]) == {"lora_A.weight"} or set(parts[n]) == {"lora_B.weight"}:
            raise UserError(f"adapter module {n} has only one of lora_A / lora_B")
        cls = kind_of(set(parts[n]), "diffusers", n)
        i = info.get(n, {})
        tensors = {role: parts[n].get(suffix) for role, suffix in cls.NATIVE_KEYS.items()}
        shape = tuple(i["shape"]) if i.get("shape") else None
        mods[n] = cls.from_file_tensors(tensors, "diffusers", n, scale=i.get("scale", 1.0), alpha=i.get("alpha"),
                                        trained_rank=i.get("rank"), shape=shape)
    return AdapterWeights(mods, meta)
