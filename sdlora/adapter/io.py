"""Adapter files: reading either layout (native diffusers/peft keys or kohya's), telling them apart, and writing
an adapter in a chosen layout. Every reader and writer of adapter files goes through here."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import safe_open

from sdlora.adapter.kohya import PREFIXES, addnet_hashes, from_kohya_state_dict, save_kohya, to_kohya_state_dict
from sdlora.adapter.weights import AdapterWeights, from_native_keys, save_native
from sdlora.errors import UserError
from sdlora.util.atomic import save_safetensors

LAYOUTS = ("diffusers", "kohya")
KOHYA_PREFIXES = tuple(PREFIXES)  # lora_unet_, lora_te_, lora_te1_ / lora_te2_ (SDXL, SD3), lora_te3_ (SD3's T5)


def detect_layout(keys) -> str:
    """`kohya` when every key starts with a kohya prefix (`KOHYA_PREFIXES`), else `diffusers` (the native layout)."""
    keys = list(keys)
    return "kohya" if keys and all(k.startswith(KOHYA_PREFIXES) for k in keys) else "diffusers"


def file_layout(path: str | Path) -> str:
    """The layout of an adapter file, from its keys alone (no tensor is read)."""
    with safe_open(str(path), framework="pt") as f:
        return detect_layout(f.keys())


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; a missing or unreadable file is one line naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"adapter file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a bad header
        raise UserError(f"{path} is not a readable safetensors file ({type(e).__name__})") from None
    return sd, meta


def load_adapter(path: str | Path) -> AdapterWeights:
    """Read an adapter in the native layout or kohya's (see `detect_layout`). A module holding NaN or inf (in a
    tensor or its alpha) is a `UserError` naming the file and the module: no reader (resize's and merge's SVDs,
    export, inspect, lora.init_from) can do anything sound with it."""
    sd, meta = read_safetensors(path)
    adapter = from_kohya_state_dict(sd, meta) if detect_layout(sd) == "kohya" else from_native_keys(sd, meta)
    for name, module in adapter.modules.items():
        bad = [role for role, t in module.tensors().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if module.alpha is not None and not math.isfinite(module.alpha):
            bad.append("alpha")
        if bad:
            raise UserError(f"{path}: module {name} holds non-finite values (NaN/inf) in {', '.join(bad)}; the file "
                            "is broken (re-export it from a finite checkpoint)")
    return adapter


def reader_notes(adapter: AdapterWeights, layout: str) -> list[str]:
    """What the other tools that read `layout` do not read exactly in this adapter (its kinds' KOHYA_NOTE), one line
    each; empty when ComfyUI, AUTOMATIC1111 and diffusers read it as sdlora does."""
    if layout != "kohya":
        return []
    from sdlora.adapter.run_record import RunRecord

    record = RunRecord.from_metadata(adapter.metadata)
    if record is not None and "kohya" in record.family.formats_missing:  # a family whose kohya names are not written
        return [f"sdlora does not write the kohya layout for {record.family.title} adapters yet"]
    return sorted({m.KOHYA_NOTE for m in adapter.modules.values() if m.KOHYA_NOTE})


def save_adapter(adapter: AdapterWeights, path: str | Path, layout: str, *, keep_metadata: bool = False,
                 tag_frequencies: dict | None = None, base_model_version: str | None = None) -> None:
    """Write `adapter` atomically in `layout`. kohya: fresh ss_*/modelspec metadata from the adapter's run record,
    or with `keep_metadata` the adapter's own metadata kept as it is (a file rewritten in place, e.g. by
    intruder mitigation), with its content hashes recomputed. `base_model_version` names the base model of a
    file without a run record (kohya's ss_base_model_version: sd_v1, sd_v2, sd_v2_v)."""
    if layout == "diffusers":
        adapter.require_diffusers_reads()  # sdlora's own files (training, checkpoints) are written by save_native
        save_native(adapter, path)
    elif layout == "kohya" and not keep_metadata:
        save_kohya(adapter, path, tag_frequencies=tag_frequencies, base_model_version=base_model_version)
    elif layout == "kohya":
        sd, meta = to_kohya_state_dict(adapter), dict(adapter.metadata)
        if "sshs_model_hash" in meta:  # the tensors changed: stale hashes would misidentify the file in A1111
            meta["sshs_model_hash"], meta["sshs_legacy_hash"] = addnet_hashes(sd, meta)
        save_safetensors(path, sd, metadata=meta)
    else:
        raise UserError(f"adapter layout {layout!r}: allowed {', '.join(LAYOUTS)}")
