"""Adapter layers. Every kind answers the same questions (`AdapterLayer`): `forward`, `delta_weight`, `merge`,
`to_record` / `load_record` (its exported record, adapter/records.py, and back), its tensors and their roles.
LoRA's (this module; DoRA in dora.py, LoHa and LoKr in lycoris.py):

    y = W' x + s · B (A x),   s = alpha / r  (standard)  or  alpha / sqrt(r)  (rank-stabilised)

W' is the frozen base weight, offset by `s0·B0·A0` for the compensated and principal inits (so the
output at step 0 is the base model's). The offset factors are kept (frozen) for two reasons: export
writes the exact update `s·B·A - s0·B0·A0`, and `adapters_disabled()` restores the original W0.

With periodic merging (`lora.merge_every`, training/periodic_merge.py; ReLoRA, Lialin et al. 2023) W' also
holds the merged pieces `Σ_k s_k·B_k·A_k`, kept beside the layer as fp32 factors (`merged_down`,
`merged_up`, rank k·r): the export writes them with the live adapter's, and `adapters_disabled()` subtracts them.

Alpha may be learnable (an fp32 parameter). It may go negative: its sign is absorbed by B (the function
class is the same), a clamp would create a dead zone where alpha stops learning, and every export folds
the signed scale into B, so no loader ever sees it.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from sdlora.lora.init import initialise
from sdlora.model.low_bits import dense_weight


class AdapterLayer(nn.Module):
    """Wraps a frozen base module (Linear or Conv2d) with one adapted module of some kind; what every kind shares:
    the scale s = alpha / r (or / sqrt r) with alpha fixed or learned, the on/off switch, and the roles of its
    tensors. A kind adds its tensors and answers `forward`, `delta_weight`, `merge`, `to_record`, `load_record`."""

    adapter_kind = "abstract"  # lora.type
    kind = "abstract"  # the module kind: linear or conv

    def __init__(self, base: nn.Module, rank: int, alpha: float, *, scaling: str = "standard",
                 learnable_alpha: bool = False):
        super().__init__()
        self.base = base
        self.rank = rank
        self.scaling = scaling
        self.enabled = True
        alpha_t = torch.tensor(float(alpha), dtype=torch.float32)
        if learnable_alpha:
            self.alpha = nn.Parameter(alpha_t)
        else:
            self.register_buffer("alpha", alpha_t)

    @classmethod
    def build(cls, base: nn.Module, spec, lora_cfg, generator: torch.Generator) -> "AdapterLayer":
        """The layer for `base` as the config and the planned LayerSpec (rank, alpha; `start`: an init_from record,
        given afterwards to `load_record`) ask."""
        raise NotImplementedError

    # -- what every kind answers -------------------------------------------------------------------
    def scale(self) -> torch.Tensor:
        denom = self.rank if self.scaling == "standard" else math.sqrt(self.rank)
        return self.alpha / denom

    def scale_value(self) -> float:
        return float(self.scale().detach())

    def delta_weight(self) -> torch.Tensor:
        """W_effective - W0 as a dense tensor in the base weight's shape (fp32)."""
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Return the base module with the effective weight W0 + ΔW written into it."""
        raise NotImplementedError

    def to_record(self, **info):
        """The exported record of this layer (adapter/records.py), every scale folded in; `info`: report fields."""
        raise NotImplementedError

    @torch.no_grad()
    def load_record(self, m, name: str) -> None:
        """Take the tensors of record `m` (scale folded in, as `to_record` writes it): lora.init_from."""
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:  # some library code reads .weight of the modules it calls
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    # Every tensor of the adapter itself (not the frozen base): kept fp32 whatever dtype the base is stored in.
    ADAPTER_TENSORS: tuple[str, ...] = ("alpha",)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self.ADAPTER_TENSORS if getattr(self, n, None) is not None}

    # The role of each trained tensor, so that optimiser groups and reports never ask a tensor's name:
    # "down" trains at the module's rate, "up" at optim.b_lr_ratio times it (LoRA+), "scale" at optim.alpha_lr
    # without weight decay (lora/groups.role_rate has every role). A kind maps its own tensors to roles.
    PARAMETER_ROLES: dict[str, str] = {"alpha": "scale"}

    def parameters_by_name(self) -> dict[str, nn.Parameter]:
        """The layer's adapter parameters (trained or frozen) by attribute name; a fixed alpha (a buffer) is not one."""
        return {n: p for n in self.PARAMETER_ROLES if isinstance(p := getattr(self, n, None), nn.Parameter)}

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Trained tensors by attribute name (frozen ones, e.g. a fixed alpha or a frozen A, are left out)."""
        return {n: p for n, p in self.parameters_by_name().items() if p.requires_grad}

    def trainable_roles(self) -> list[tuple[str, nn.Parameter]]:
        """(role, tensor) of every trained tensor (see PARAMETER_ROLES); a role may hold several tensors."""
        return [(self.PARAMETER_ROLES[n], p) for n, p in self.trainable_parameters().items()]


class LoRALayer(AdapterLayer):
    """Wraps a frozen base module; subclasses define how A and B are applied."""

    adapter_kind = "lora"

    def __init__(self, base: nn.Module, rank: int, alpha: float, *, scaling: str = "standard", init: str = "zero",
                 learnable_alpha: bool = False, train_a: bool = True, generator: torch.Generator | None = None):
        super().__init__(base, rank, alpha, scaling=scaling, learnable_alpha=learnable_alpha)
        self.init_scheme = init
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        w = self.base.weight.detach()
        a, b, offset = initialise(init, w.flatten(1), rank, float(self.scale_value()), gen)
        self.lora_A = nn.Parameter(self._shape_a(a.float()), requires_grad=train_a)
        self.lora_B = nn.Parameter(self._shape_b(b.float()))
        if offset is not None:
            with torch.no_grad():
                w64 = w.to(torch.float64) - offset.reshape(w.shape)
                self.base.weight.copy_(w64.to(w.dtype))
            s0 = float(self.scale_value())
            self.register_buffer("offset_A", self._shape_a(a.float()))
            self.register_buffer("offset_B", self._shape_b((s0 * b).float()))  # s0 folded in
        else:
            self.offset_A = None
            self.offset_B = None
        # periodic merging's pieces already in W' (plain fp32 tensors, not state: periodic_merge.py saves them)
        self.merged_down: torch.Tensor | None = None  # (k·r, in[, kh, kw]): [A_1; ...; A_k]
        self.merged_up: torch.Tensor | None = None  # (out, k·r[, 1, 1]): [s_1·B_1 | ... | s_k·B_k]

    @classmethod
    def build(cls, base, spec, lora_cfg, generator):
        # init_from: built with the zero init, then given the file's factors (load_record)
        return cls(base, spec.rank, spec.alpha, scaling=lora_cfg.scaling, init="zero" if spec.start else lora_cfg.init,
                   learnable_alpha=lora_cfg.learnable_alpha, train_a=lora_cfg.train_a, generator=generator)

    # -- what every kind answers -------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.enabled:  # the scale goes into B (out x r), far smaller than the activations it would otherwise scale
            return y + self._lowrank(x, self.lora_A, self.lora_B * self.scale())
        if self.offset_A is not None:  # adapters off: restore W0 = W' + s0·B0·A0
            y = y + self._lowrank(x, self.offset_A, self.offset_B)
        if self.merged_down is not None:  # ... - Σ_k s_k·B_k·A_k, the merged pieces
            y = y - self._lowrank(x, self.merged_down, self.merged_up)
        return y

    def delta_weight(self) -> torch.Tensor:
        """W_effective - W0 as a dense tensor in the base weight's shape (fp32)."""
        down, up = self.export_factors()
        return self._dense(down, up)

    def export_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) with every scale folded into up, the total update W_effective - W0: the live adapter's
        (`live_factors`) and, after periodic merges, the merged pieces' `[... | s_1·B_1 | ...]·[... ; A_1 ; ...]`."""
        down, up = self.live_factors()
        if self.merged_down is not None:
            down, up = torch.cat([down, self.merged_down], 0), torch.cat([up, self.merged_up], 1)
        return down, up

    def live_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The live adapter's (down, up), scale folded into up; rank 2r `[s·B | -s0·B0]·[A ; A0]` where the base was
        offset. fp32 copies."""
        s = self.scale().detach().float()
        down = self.lora_A.detach().float()
        up = self.lora_B.detach().float() * s
        if self.offset_A is not None:
            down = torch.cat([down, self.offset_A.float()], 0)
            up = torch.cat([up, -self.offset_B.float()], 1)
        return down.clone(), up.clone()

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Return the base module with the effective weight W0 + ΔW written into it."""
        w = self.base.weight  # W' = W0 - s0·B0·A0 + merged pieces: add s0·B0·A0 and the live update
        if self.offset_A is not None:
            w += self._dense(self.offset_A.float(), self.offset_B.float()).to(w.dtype)
        w += self._dense(*self.live_factors()).to(w.dtype)
        return self.base

    # Every tensor of the adapter itself (not the frozen base): kept fp32 whatever dtype the base is stored in.
    ADAPTER_TENSORS = ("lora_A", "lora_B", "alpha", "offset_A", "offset_B")

    # "down" trains at the module's rate, "up" at optim.b_lr_ratio times it (LoRA+), "scale" at optim.alpha_lr.
    PARAMETER_ROLES = {"lora_A": "down", "lora_B": "up", "alpha": "scale"}

    def to_record(self, **info):
        from sdlora.adapter.records import ModuleDelta

        return ModuleDelta(*self.export_factors(), **info)

    @torch.no_grad()
    def load_record(self, m, name: str) -> None:
        """A = down, B = up / s, so s·B·A = ΔW of the file; a kind's own tensors (DoRA's magnitude) as they are."""
        s = self.scale_value()
        self.lora_A.copy_(m.down.float().reshape(self.lora_A.shape))
        self.lora_B.copy_((m.up.double() / s).float().reshape(self.lora_B.shape))
        for role, t in m.tensors().items():
            if role not in ("down", "up"):
                getattr(self, role).copy_(t.float().reshape(getattr(self, role).shape))

    # -- per kind ------------------------------------------------------------------------------------
    def _shape_a(self, a: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _shape_b(self, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _lowrank(self, x, a, b):
        raise NotImplementedError

    def _dense(self, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])


class _FusedLinearLoRA(torch.autograd.Function):
    """y = x Wᵀ + bias + s·(x Aᵀ) Bᵀ as one autograd node; s = alpha / r (or / sqrt r) is a 0-dim tensor.

    The low-rank product is accumulated into the base output in place (`addmm_`), and in the backward x's
    two gradients, g W and s·(g B) A, are summed the same way; so neither pass allocates an activation-sized
    tensor beyond what the frozen layer alone needs, the graph has one node per layer instead of six, and the
    scale multiplies N x r tensors, never a copy of B. Saved: x (A's gradient needs it, as for any LoRA) and
    h = x Aᵀ (N x r). All inputs but the weight arrive in one dtype (the caller casts them); the weight arrives as
    stored and is cast (or, low-bit, upcast: model/low_bits.py) in each pass; autocast is off inside.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, s):
        x2 = x.reshape(-1, x.shape[-1])
        h = x2 @ a.t()
        y = F.linear(x2, dense_weight(weight, x.dtype), bias)
        y.addmm_(h * s.to(h.dtype), b.t())
        need_x = ctx.needs_input_grad[3] or ctx.needs_input_grad[1]
        # the weight as stored: a low-bit base (model/low_bits.py) is upcast again in the backward, not kept upcast
        ctx.stored_weight = weight
        ctx.save_for_backward(x2 if need_x else None, a, b, h, s)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, a, b, h, s = ctx.saved_tensors
        weight = dense_weight(ctx.stored_weight, grad.dtype)
        g = grad.reshape(-1, grad.shape[-1])
        need = ctx.needs_input_grad
        gh = (g @ b) * s.to(g.dtype)  # N x r: the gradient reaching h
        grad_x = grad_w = grad_bias = grad_a = grad_b = grad_s = None
        if need[0]:
            grad_x = (gh @ a).addmm_(g, weight).view(ctx.x_shape)
        if need[1]:
            grad_w = g.t() @ x2
        if need[2]:
            grad_bias = g.sum(0)
        if need[3]:
            grad_a = gh.t() @ x2
        if need[4] or need[5]:
            gb = g.t() @ h  # out x r: the gradient reaching the product s·B
            if need[4]:
                grad_b = gb * s.to(gb.dtype)
            if need[5]:
                acc = torch.promote_types(gb.dtype, torch.float32)  # bf16/fp16 products summed in fp32
                grad_s = (gb.to(acc) * b.to(acc)).sum().to(s.dtype)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, grad_s


class LoRALinear(LoRALayer):
    kind = "linear"

    def _shape_a(self, a):
        return a

    def _shape_b(self, b):
        return b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return super().forward(x)
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        base = self.base
        bias = base.bias.to(dtype) if base.bias is not None else None
        with torch.autocast(device, enabled=False):  # s stays fp32 (autograd carries its gradient on to alpha)
            return _FusedLinearLoRA.apply(x.to(dtype), base.weight, bias, self.lora_A.to(dtype),
                                          self.lora_B.to(dtype), self.scale())

    def _lowrank(self, x, a, b):
        return F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))


class LoRAConv2d(LoRALayer):
    """A: conv with the base kernel, stride, padding and dilation (r x in x kh x kw); B: 1x1 conv (out x r)."""

    kind = "conv"

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float, **kw):
        if base.groups != 1:
            raise ValueError("grouped convolutions are not supported")
        super().__init__(base, rank, alpha, **kw)

    def _shape_a(self, a):
        return a.reshape(self.rank, *self.base.weight.shape[1:])

    def _shape_b(self, b):
        return b.reshape(b.shape[0], b.shape[1], 1, 1)

    def _lowrank(self, x, a, b):
        c = self.base
        h = F.conv2d(x, a.to(x.dtype), None, c.stride, c.padding, c.dilation)
        return F.conv2d(h, b.to(x.dtype))


def lora_layers(model: nn.Module):
    """(qualified name of the wrapped module, layer) for every adapter layer (any kind) in `model`."""
    for name, m in model.named_modules():
        if isinstance(m, AdapterLayer):
            yield name, m


@contextlib.contextmanager
def adapters_disabled(*models: nn.Module):
    """Run the original base model (W0) inside the block, whatever the init scheme."""
    layers = [m for model in models for _, m in lora_layers(model)]
    saved = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield
    finally:
        for m, e in zip(layers, saved):
            m.enabled = e
