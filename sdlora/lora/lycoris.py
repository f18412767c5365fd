"""LoHa and LoKr layers (LyCORIS' kinds; maths in adapter/functional.py, records in adapter/lycoris.py):

    y = W0 x + s · ΔW x,   LoHa: ΔW = (w1a @ w1b) ⊙ (w2a @ w2b),   LoKr: ΔW = w1 ⊗ w2 (w2 optionally w2a @ w2b)

with s = alpha / r (or alpha / sqrt r), alpha fixed or learned, for every kind and structure (LyCORIS applies no
alpha to a LoKr whose factors are both full; sdlora does, and folds s into the exported factors, so every loader
reads the trained update). The update is formed densely from the fp32 factors each step (a Hadamard product has no
cheaper form; LoKr's is as large as the weight) and applied with the base layer's own op beside the frozen output,
so gradients reach every factor and alpha through autograd. The base weight is never changed (no offset init).
Conv layers use LyCORIS' non-Tucker form (the (r, in·kh·kw) factors flattened).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdlora.adapter.functional import factorization, hadamard_product, kronecker_product
from sdlora.errors import UserError
from sdlora.lora.init import init_loha, init_lokr
from sdlora.lora.layers import AdapterLayer


class LycorisLayer(AdapterLayer):
    """What LoHa and LoKr share: a dense update s · product() added to the frozen layer's output."""

    TENSOR_NAMES: tuple[str, ...] = ()  # the adapter's own tensors (attribute name = file key suffix)

    def __init__(self, base: nn.Module, rank: int, alpha: float, *, scaling: str = "standard", init: str = "zero",
                 learnable_alpha: bool = False):
        if isinstance(base, nn.Conv2d) and base.groups != 1:
            raise ValueError("grouped convolutions are not supported")
        super().__init__(base, rank, alpha, scaling=scaling, learnable_alpha=learnable_alpha)
        self.kind = "conv" if isinstance(base, nn.Conv2d) else "linear"
        self.init_scheme = init

    def _set_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for name in self.TENSOR_NAMES:  # absent alternatives (LoKr's) are None, as offset_A is for LoRA
            setattr(self, name, nn.Parameter(tensors[name].float()) if name in tensors else None)

    def product(self) -> torch.Tensor:
        """The unscaled update as an (out, in·kh·kw) matrix, in the factors' dtype, with gradients."""
        raise NotImplementedError

    def scaled_delta(self) -> torch.Tensor:
        """s · product() in the base weight's shape, in the factors' dtype (fp32; float64 in tests)."""
        p = self.product()
        return (p * self.scale().to(p.dtype)).reshape(self.base.weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        device = x.device.type
        dt = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        w = self.scaled_delta().to(dt)
        if self.kind == "linear":
            return y + F.linear(x.to(dt), w)
        c = self.base
        return y + F.conv2d(x.to(dt), w, None, c.stride, c.padding, c.dilation)

    def delta_weight(self) -> torch.Tensor:
        with torch.no_grad():
            return self.scaled_delta().float()

    @torch.no_grad()
    def merge(self) -> nn.Module:
        w = self.base.weight
        w.copy_((w.to(torch.float64) + self.scaled_delta().double()).to(w.dtype))
        return self.base

    def _record(self, cls, first: str, **info):
        """`cls` from the tensors with the scale folded into the `first` one (record role names)."""
        tensors = {role: getattr(self, key).detach().float().clone() for role, key in cls.NATIVE_KEYS.items()
                   if getattr(self, key) is not None}
        tensors[first] = tensors[first] * self.scale().detach().float()
        return cls(**tensors, shape=tuple(self.base.weight.shape), **info)

    @torch.no_grad()
    def load_record(self, m, name: str) -> None:
        """Every tensor of `m` into the attribute of its key name, the scale taken back out of the first factor."""
        m = m.scaled(1.0 / self.scale_value())
        for role, t in m.tensors().items():
            key = m.NATIVE_KEYS[role]
            p = getattr(self, key, None)
            if p is None or p.numel() != t.numel():
                have = {k: tuple(getattr(self, k).shape) for k in self.TENSOR_NAMES if getattr(self, k) is not None}
                raise UserError(f"lora.init_from: module {name}: the file's {key} {tuple(t.shape)} does not fit this "
                                f"layer's {self.adapter_kind} tensors {have}")
            p.copy_(t.float().reshape(p.shape))


class LoHaLayer(LycorisLayer):
    """ΔW = (w1a @ w1b) ⊙ (w2a @ w2b): w1a, w2a (out, r) train as "up" (optim.b_lr_ratio applies), w1b, w2b
    (r, in·kh·kw) as "down"."""

    adapter_kind = "loha"
    TENSOR_NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    ADAPTER_TENSORS = TENSOR_NAMES + ("alpha",)
    PARAMETER_ROLES = {"hada_w1_a": "up", "hada_w1_b": "down", "hada_w2_a": "up", "hada_w2_b": "down", "alpha": "scale"}

    def __init__(self, base: nn.Module, rank: int, alpha: float, *, scaling: str = "standard", init: str = "zero",
                 learnable_alpha: bool = False, generator: torch.Generator | None = None):
        super().__init__(base, rank, alpha, scaling=scaling, init=init, learnable_alpha=learnable_alpha)
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        w = base.weight
        self._set_tensors(dict(zip(self.TENSOR_NAMES, init_loha(init, w.shape[0], w[0].numel(), rank, gen))))

    @classmethod
    def build(cls, base, spec, lora_cfg, generator):
        return cls(base, spec.rank, spec.alpha, scaling=lora_cfg.scaling, init="zero" if spec.start else lora_cfg.init,
                   learnable_alpha=lora_cfg.learnable_alpha, generator=generator)

    def product(self) -> torch.Tensor:
        return hadamard_product(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b)

    def to_record(self, **info):
        from sdlora.adapter.lycoris import LoHaDelta

        return self._record(LoHaDelta, "w1a", **info)


class LoKrLayer(LycorisLayer):
    """ΔW = w1 ⊗ w2 with out = a·b and in = c·d split by LyCORIS' `factorization(dim, lora.lokr_factor)` (w1 takes
    the smaller part). w2 is the low-rank w2a @ w2b where r < max(b, d) / 2 and a full matrix otherwise (LyCORIS'
    rule); w1 is full (a file's decomposed w1a @ w1b is taken over by lora.init_from). Roles: full factors "factor"
    (the module's rate), w2a / w1a "up", w2b / w1b "down"."""

    adapter_kind = "lokr"
    TENSOR_NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
    ADAPTER_TENSORS = TENSOR_NAMES + ("alpha",)
    PARAMETER_ROLES = {"lokr_w1": "factor", "lokr_w1_a": "up", "lokr_w1_b": "down",
                       "lokr_w2": "factor", "lokr_w2_a": "up", "lokr_w2_b": "down", "alpha": "scale"}

    def __init__(self, base: nn.Module, rank: int, alpha: float, *, scaling: str = "standard", init: str = "zero",
                 learnable_alpha: bool = False, generator: torch.Generator | None = None, factor: int = -1,
                 like=None):
        super().__init__(base, rank, alpha, scaling=scaling, init=init, learnable_alpha=learnable_alpha)
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        out, cin, *kernel = base.weight.shape
        if like is None:
            (a, b), (c, d) = factorization(out, factor), factorization(cin, factor)
            decompose_w1, decompose_w2 = False, rank < max(b, d) / 2
        else:  # lora.init_from: the file's structure
            a, c = like.w1.shape if like.w1 is not None else (like.w1a.shape[0], like.w1b.shape[1])
            if out % a or cin % c:
                raise UserError(f"lora.init_from: a LoKr w1 of shape ({a}, {c}) does not divide the weight "
                                f"{tuple(base.weight.shape)}")
            b, d = out // a, cin // c
            decompose_w1, decompose_w2 = like.w1 is None, like.w2 is None
        self.factors = ((a, b), (c, d))
        self._set_tensors(init_lokr((a, c), (b, d, *kernel), rank, decompose_w1, decompose_w2, gen))

    @classmethod
    def build(cls, base, spec, lora_cfg, generator):
        return cls(base, spec.rank, spec.alpha, scaling=lora_cfg.scaling, init="zero" if spec.start else lora_cfg.init,
                   learnable_alpha=lora_cfg.learnable_alpha, generator=generator, factor=lora_cfg.lokr_factor,
                   like=spec.start)

    def product(self) -> torch.Tensor:
        w1 = self.lokr_w1 if self.lokr_w1 is not None else self.lokr_w1_a @ self.lokr_w1_b
        w2 = self.lokr_w2 if self.lokr_w2 is not None else self.lokr_w2_a @ self.lokr_w2_b
        return kronecker_product(w1, w2)

    def to_record(self, **info):
        from sdlora.adapter.lycoris import LoKrDelta

        return self._record(LoKrDelta, "w1" if self.lokr_w1 is not None else "w1a", **info)
