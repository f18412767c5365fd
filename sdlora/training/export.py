"""From trained LoRA layers to an adapter file: factors with every scale folded in, plus metadata."""

from __future__ import annotations

from pathlib import Path

import torch

from sdlora.adapter.run_record import RunRecord
from sdlora.adapter.weights import AdapterWeights, ModuleDelta, save_native
from sdlora.lora.layers import LoRALayer

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def reduce_rank(down: torch.Tensor, up: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`rank` factorisation of up @ down (truncated SVD, float64); returns the relative Frobenius error."""
    d2, u2 = down.flatten(1).double(), up.flatten(1).double()
    qu, ru = torch.linalg.qr(u2)
    qd, rd = torch.linalg.qr(d2.T)
    uu, s, vh = torch.linalg.svd(ru @ rd.T)
    total = torch.linalg.norm(s)
    err = float(torch.linalg.norm(s[rank:]) / total) if total > 0 else 0.0
    root = torch.sqrt(s[:rank])
    new_up = (qu @ uu[:, :rank]) * root
    new_down = root[:, None] * (vh[:rank] @ qd.T)
    return (new_down.reshape(rank, *down.shape[1:]).float(), new_up.reshape(up.shape[0], rank, *up.shape[2:]).float(), err)


def adapter_from_layers(layers: dict[str, LoRALayer], *, reduce_to_rank: bool = False,
                        report=None) -> AdapterWeights:
    """Per-module exact factors; with `reduce_to_rank`, rank-2r offset-init factors are truncated back to r."""
    modules = {}
    for name, layer in layers.items():
        down, up = layer.export_factors()
        if reduce_to_rank and down.shape[0] > layer.rank:
            down, up, err = reduce_rank(down, up, layer.rank)
            if report is not None:
                report(f"export.reduce_rank: {name}: rank {2 * layer.rank} -> {layer.rank}, relative error {err:.2e}")
        modules[name] = ModuleDelta(down, up, scale=layer.scale_value(), alpha=float(layer.alpha.detach()),
                                    trained_rank=layer.rank)
    return AdapterWeights(modules)


def export_adapter(layers: dict[str, LoRALayer], path: str | Path, cfg, record: RunRecord, *, steps: int,
                   report=None) -> AdapterWeights:
    """Write the adapter (native layout, `export.dtype`) with the run record at `steps` as its metadata."""
    adapter = adapter_from_layers(layers, reduce_to_rank=cfg.export.reduce_rank, report=report)
    adapter.metadata.update(record.at_step(steps).to_metadata())
    adapter = adapter.to(DTYPES[cfg.export.dtype])
    save_native(adapter, path)
    return adapter
