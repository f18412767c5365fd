"""The one table of dtype names: what `export.dtype`, `--dtype` and `train.mixed_precision` say, as torch dtypes."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # export.dtype, every --dtype
HALF_DTYPES = (torch.float16, torch.bfloat16)  # 16-bit: adapter files balance their factors (records.balanced)


def torch_dtype(name: str) -> torch.dtype:
    """`fp32` / `fp16` / `bf16`, or train.mixed_precision's `no` (Accelerate's word: no autocast, fp32 weights)."""
    return DTYPES["fp32" if name == "no" else name]
