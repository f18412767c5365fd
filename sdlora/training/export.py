"""From trained LoRA layers to an adapter file: factors with every scale folded in, plus metadata."""

from __future__ import annotations

from pathlib import Path

import torch

from sdlora.adapter.run_record import RunRecord
from sdlora.adapter.weights import AdapterWeights, save_native
from sdlora.lora.layers import AdapterLayer

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
UI_FILE = "adapter_kohya.safetensors"  # beside adapter.safetensors: the run's file for ComfyUI and AUTOMATIC1111


def adapter_from_layers(layers: dict[str, AdapterLayer], *, reduce_to_rank: bool = False,
                        report=None) -> AdapterWeights:
    """Per-module exact records; with `reduce_to_rank`, rank-2r offset-init LoRA factors are truncated back to r."""
    modules = {}
    for name, layer in layers.items():
        record = layer.to_record(scale=layer.scale_value(), alpha=float(layer.alpha.detach()), trained_rank=layer.rank)
        if reduce_to_rank:
            record, err = record.truncated(layer.rank)
            if err is not None and report is not None:
                report(f"export.reduce_rank: {name}: rank {2 * layer.rank} -> {layer.rank}, relative error {err:.2e}")
        modules[name] = record
    return AdapterWeights(modules)


def export_adapter(layers: dict[str, AdapterLayer], path: str | Path, cfg, record: RunRecord, *, steps: int,
                   report=None) -> AdapterWeights:
    """Write the adapter (native layout, `export.dtype`) with the run record at `steps` as its metadata."""
    adapter = adapter_from_layers(layers, reduce_to_rank=cfg.export.reduce_rank, report=report)
    adapter.metadata.update(record.at_step(steps).to_metadata())
    adapter = adapter.to(DTYPES[cfg.export.dtype])
    save_native(adapter, path)
    return adapter


def export_for_uis(adapter_path: Path, out: Path, cfg) -> str:
    """The run's file for ComfyUI and AUTOMATIC1111 (the kohya layout, which they read; adapter.safetensors' diffusers
    layout leaves ComfyUI's UNet attention modules unloaded), written from the run's adapter; returns the line the
    run's end message gives. A kind those tools do not read exactly (DoRA: `io.reader_notes`) gets no such file, and
    the line says so (docs/formats.md, benchmarks/comfyui_check.py)."""
    from sdlora.adapter.io import load_adapter, reader_notes, save_adapter
    from sdlora.commands.export import _tag_frequencies

    adapter = load_adapter(adapter_path)
    notes = reader_notes(adapter, "kohya")
    if notes:
        return f"no file for ComfyUI / AUTOMATIC1111: {notes[0]}"
    try:
        save_adapter(adapter, out, "kohya", tag_frequencies=_tag_frequencies(cfg.to_dict()))
    except OSError as e:  # a full disk here loses nothing: adapter.safetensors is written and holds the same
        return (f"{out} could not be written ({e.strerror or e}); write it with: sdlora export {adapter_path} "
                f"--format kohya --out {out}")
    return f"for ComfyUI / AUTOMATIC1111: {out}"
