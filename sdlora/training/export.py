"""From trained LoRA layers to an adapter file: factors with every scale folded in, plus metadata."""

from __future__ import annotations

import copy
from pathlib import Path

from sdlora.adapter.run_record import RunRecord
from sdlora.adapter.weights import AdapterWeights, save_native
from sdlora.errors import UserError
from sdlora.lora.layers import AdapterLayer
from sdlora.util.dtypes import DTYPES

UI_FILE = "adapter_kohya.safetensors"  # beside adapter.safetensors: the run's file for ComfyUI and AUTOMATIC1111


def adapter_from_layers(layers: dict[str, AdapterLayer], *, reduce_to_rank: bool = False,
                        report=None) -> AdapterWeights:
    """Per-module exact records; with `reduce_to_rank`, LoRA factors above the trained rank r (offset inits: 2r; periodic
    merging: (k+1)·r) are truncated back to r (adapter/algebra.factor_to_rank), the error reported."""
    modules = {}
    for name, layer in layers.items():
        record = layer.to_record(scale=layer.scale_value(), alpha=float(layer.alpha.detach()), trained_rank=layer.rank)
        if reduce_to_rank:
            rank = record.rank
            record, err = record.truncated(layer.rank)
            if err is not None and report is not None:
                report(f"export.reduce_rank: {name}: rank {rank} -> {layer.rank}, relative error {err:.2e} (keeps "
                       f"{1 - err ** 2:.2%} of the update's squared Frobenius norm)")
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


def export_for_uis(adapter_path: Path, out: Path) -> str:
    """The run's file for ComfyUI and AUTOMATIC1111 (the kohya layout, which they read; adapter.safetensors' diffusers
    layout leaves ComfyUI's UNet attention modules unloaded), written from the run's adapter; returns the line the
    run's end message gives. A kind those tools do not read exactly (DoRA: `io.reader_notes`) gets no such file, and
    the line says so (docs/formats.md, benchmarks/comfyui_check.py)."""
    from sdlora.adapter.io import load_adapter, reader_notes, save_adapter

    adapter = load_adapter(adapter_path)
    notes = reader_notes(adapter, "kohya")
    if notes:
        return f"no file for ComfyUI / AUTOMATIC1111: {notes[0]}"
    try:
        record = RunRecord.from_metadata(adapter.metadata)
        save_adapter(adapter, out, "kohya", tag_frequencies=record.tag_frequency if record is not None else None)
    except UserError as e:  # the layout cannot hold it (SD3's LoKr on q/k/v: kohya_modules)
        return f"no file for ComfyUI / AUTOMATIC1111: {e}"
    except OSError as e:  # a full disk here loses nothing: adapter.safetensors is written and holds the same
        return (f"{out} could not be written ({e.strerror or e}); write it with: sdlora export {adapter_path} "
                f"--format kohya --out {out}")
    return f"for ComfyUI / AUTOMATIC1111: {out}"


def layers_holding(layers: dict[str, AdapterLayer], tensors: dict[str, torch.Tensor]) -> dict[str, AdapterLayer]:
    """Views of `layers` that hold `tensors` (keyed `<module>.<tensor>`, as `ema.adapter_tensors` keys them) instead
    of their own: shallow copies sharing the base modules and every tensor not given. The layers are not changed."""
    views = {}
    for name, layer in layers.items():
        view = copy.copy(layer)
        view._parameters, view._buffers = dict(layer._parameters), dict(layer._buffers)
        for table in (view._parameters, view._buffers):
            for key in table:
                if f"{name}.{key}" in tensors:
                    table[key] = tensors[f"{name}.{key}"]
        views[name] = view
    return views


class Exporter:
    """Writes the run's adapter files: `exporter(path, steps, report=None, tensors=None)`, the live layers' adapter,
    or with `tensors` (the EMA's `average()`) those in their place, with the run record at `steps`."""

    def __init__(self, layers: dict[str, AdapterLayer], cfg, record: RunRecord):
        self.layers, self.cfg, self.record = layers, cfg, record

    def __call__(self, path: str | Path, steps: int, report=None, tensors: dict | None = None) -> AdapterWeights:
        layers = self.layers if tensors is None else layers_holding(self.layers, tensors)
        return export_adapter(layers, path, self.cfg, self.record, steps=steps, report=report)
