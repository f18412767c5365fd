"""From trained LoRA layers to an adapter file: factors with every scale folded in, plus metadata."""

from __future__ import annotations

from pathlib import Path

from sdlora.adapter.run_record import RunRecord
from sdlora.adapter.weights import AdapterWeights, save_native
from sdlora.lora.layers import AdapterLayer
from sdlora.util.dtypes import DTYPES


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
