"""DoRA layers (Liu et al. 2024): W = m ⊙ V / ‖V‖ per output feature, V = W' + s·B·A (adapter/functional.py).

W' is the frozen base weight, offset by s0·B0·A0 under the compensated and principal inits exactly as for LoRA, so
V = W0 at step 0 under every init; m starts at ‖W0‖ (computed in float64 from the original weight), hence the output
at step 0 is the base model's for all four inits. s (learnable alpha included) scales B·A inside V; m is a
parameter of its own role ("magnitude": the module's rate, no weight decay: decay would pull every weight to 0).

The forward forms the adapted weight densely (one (out, in·kh·kw) matrix per layer, as peft's DoRA does for its
norm) and applies it with the base layer's own F.linear / F.conv2d; the norm is detached (the paper's section 4.3,
peft's rule). Exported as (down, up, magnitude): `export_factors` as for LoRA plus m (weights.DoRADelta).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdlora.adapter.functional import dora_weight, row_norm
from sdlora.lora.layers import LoRAConv2d, LoRALayer, LoRALinear
from sdlora.model.low_bits import dense_weight


class DoRAMixin:
    """What DoRA adds to a LoRA layer class: the magnitude, the decomposed forward, its record and merge."""

    adapter_kind = "dora"
    ADAPTER_TENSORS = LoRALayer.ADAPTER_TENSORS + ("magnitude",)
    PARAMETER_ROLES = {**LoRALayer.PARAMETER_ROLES, "magnitude": "magnitude"}

    def __init__(self, base, rank, alpha, **kw):
        super().__init__(base, rank, alpha, **kw)
        self.magnitude = nn.Parameter(row_norm(self.original_weight()).float())

    def original_weight(self) -> torch.Tensor:
        """W0 in float64: the stored base weight plus the init's offset s0·B0·A0 (if any)."""
        w = dense_weight(self.base.weight, torch.float64).detach()
        if self.offset_A is not None:
            w = w + self._dense(self.offset_A.double(), self.offset_B.double())
        return w

    def adapted_weight(self) -> torch.Tensor:
        """m ⊙ V / ‖V‖ (detached norm) in the adapter's dtype (fp32; float64 in tests), with gradients to A, B,
        alpha and m. The frozen base weight (fp16/bf16 under mixed precision; fp8 / int8 / int4 under
        model.base_precision, model/low_bits.py) is promoted to it."""
        dt = torch.promote_types(self.lora_A.dtype, torch.float32)
        w = dense_weight(self.base.weight, dt)
        return dora_weight(w, self._dense(self.lora_A.to(dt), self.lora_B.to(dt) * self.scale().to(dt)),
                           self.magnitude.to(dt))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return LoRALayer.forward(self, x)  # W' + s0·B0·A0 = W0
        return self._apply_weight(x, self.adapted_weight())

    def delta_weight(self) -> torch.Tensor:
        with torch.no_grad():
            return (self.adapted_weight().double() - self.original_weight()).float()

    @torch.no_grad()
    def merge(self) -> nn.Module:
        self.base.weight.copy_(self.adapted_weight().to(self.base.weight.dtype))
        return self.base

    def to_record(self, **info):
        from sdlora.adapter.records import DoRADelta

        return DoRADelta(*self.export_factors(), magnitude=self.magnitude.detach().float().clone(), **info)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class DoRALinear(DoRAMixin, LoRALinear):
    def _apply_weight(self, x, w):
        dt, bias = _compute_dtype(x), self.base.bias
        return F.linear(x.to(dt), w.to(dt), bias.to(dt) if bias is not None else None)


class DoRAConv2d(DoRAMixin, LoRAConv2d):
    def _apply_weight(self, x, w):
        c, dt = self.base, _compute_dtype(x)
        return F.conv2d(x.to(dt), w.to(dt), c.bias.to(dt) if c.bias is not None else None, c.stride, c.padding,
                        c.dilation)
