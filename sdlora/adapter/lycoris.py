"""The records of LyCORIS' LoHa and LoKr kinds (maths in adapter/functional.py), in the key names LyCORIS, kohya's
LyCORIS loader, AUTOMATIC1111, ComfyUI and peft all use: `hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b` and
`lokr_w1` (or `lokr_w1_a` / `lokr_w1_b`), `lokr_w2` (or `lokr_w2_a` / `lokr_w2_b`), plus `.alpha` in kohya files.

Scale conventions, as LyCORIS (modules/loha.py, modules/lokr.py), ComfyUI (comfy/weight_adapter/loha.py, lokr.py),
AUTOMATIC1111 (extensions-builtin/Lora/network_hada.py, network_lokr.py) and diffusers (`_bake_lokr_alpha_`) read
them: LoHa's ΔW is multiplied by alpha / r with r = hada_w1_b's rows. LoKr's by alpha / r with r the rank of a
decomposed factor (lokr_w2_b's rows, else lokr_w1_b's); when both LoKr factors are full matrices no alpha applies.
sdlora folds its scale into the first factor (hada_w1_a, lokr_w1 / lokr_w1_a) and writes `.alpha` = r, so every
loader reads scale 1. Conv weights are LyCORIS' non-Tucker form: the (r, in·kh·kw) factors flattened, a full lokr_w2
(b, d, kh, kw); Tucker files (hada_t1 / lokr_t2) and LyCORIS' weight-decomposed variants (dora_scale) are not read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from sdlora.adapter.algebra import balance_factors
from sdlora.adapter.functional import hadamard_product, kronecker_product
from sdlora.adapter.records import AdapterDelta
from sdlora.errors import UserError


def _scaled(t: torch.Tensor, factor: float) -> torch.Tensor:
    return (t.double() * factor).to(t.dtype)


def equalise(first: list[torch.Tensor], second: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Two groups of tensors whose product ΔW is bilinear in the groups (c·X ∘ Y/c = X ∘ Y) rescaled so that the two
    groups carry equal magnitude (product of Frobenius norms), each tensor of a group taking an equal share: with
    the scale folded into one factor, a 16-bit file then keeps 16-bit precision (see algebra.balance_factors)."""
    def magnitude(ts):
        return math.prod(float(torch.linalg.vector_norm(t.double())) for t in ts)

    m1, m2 = magnitude(first), magnitude(second)
    if m1 == 0 or m2 == 0:
        return first, second
    c = math.sqrt(m2 / m1)
    return ([_scaled(t, c ** (1 / len(first))) for t in first], [_scaled(t, c ** (-1 / len(second))) for t in second])


@dataclass
class LoHaDelta(AdapterDelta):
    """LoHa: ΔW = (w1a @ w1b) ⊙ (w2a @ w2b), every scale in w1a. w1a, w2a: (out, r); w1b, w2b: (r, in·kh·kw)."""

    w1a: torch.Tensor
    w1b: torch.Tensor
    w2a: torch.Tensor
    w2b: torch.Tensor

    kind: ClassVar[str] = "loha"
    TITLE: ClassVar[str] = "LoHa"
    UPDATE: ClassVar[str] = "is a Hadamard product of two rank-r products (rank up to r²), not up @ down"
    TENSORS: ClassVar[tuple[str, ...]] = ("w1a", "w1b", "w2a", "w2b")
    NATIVE_KEYS: ClassVar[dict[str, str]] = {"w1a": "hada_w1_a", "w1b": "hada_w1_b", "w2a": "hada_w2_a", "w2b": "hada_w2_b"}
    KOHYA_KEYS: ClassVar[dict[str, str]] = NATIVE_KEYS
    NETWORK_ARGS: ClassVar[dict[str, str]] = {"algo": "loha"}
    DIFFUSERS_READS: ClassVar[bool] = False

    @property
    def rank(self) -> int:
        return self.w1b.shape[0]

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self.shape or (self.w1a.shape[0], self.w1b.shape[1])

    def delta_weight(self, base: torch.Tensor | None = None) -> torch.Tensor:
        """In float64, in the base weight's shape (given) or `weight_shape`."""
        return self.in_shape_of(hadamard_product(*(t.double() for t in (self.w1a, self.w1b, self.w2a, self.w2b))), base)

    def scaled(self, factor: float) -> "LoHaDelta":
        return replace(self, w1a=_scaled(self.w1a, factor))

    def balanced(self) -> "LoHaDelta":
        w1b, w1a = balance_factors(self.w1b, self.w1a)
        w2b, w2a = balance_factors(self.w2b, self.w2a)
        (w1a, w1b), (w2a, w2b) = equalise([w1a, w1b], [w2a, w2b])
        return replace(self, w1a=w1a, w1b=w1b, w2a=w2a, w2b=w2b)

    @classmethod
    def from_file_tensors(cls, tensors, layout, where, **info):
        t = tensors
        if any(x.dim() != 2 for x in t.values()):
            raise UserError(f"LoHa module {where}: 4-d hada tensors (Tucker form, hada_t1/hada_t2) are not supported")
        out, k = t["w1a"].shape[0], t["w1b"].shape[1]
        if (t["w1a"].shape[1] != t["w1b"].shape[0] or t["w2a"].shape[1] != t["w2b"].shape[0]
                or (t["w2a"].shape[0], t["w2b"].shape[1]) != (out, k)):
            raise UserError(f"LoHa module {where}: factor shapes {[tuple(x.shape) for x in t.values()]} do not make two "
                            "products of one shape")
        return cls(**t, **info)


@dataclass
class LoKrDelta(AdapterDelta):
    """LoKr: ΔW = w1 ⊗ w2, every scale in w1 (or w1a). w1: (a, c), or w1a (a, r) @ w1b (r, c); w2: (b, d) or
    (b, d, kh, kw), or w2a (b, r) @ w2b (r, d·kh·kw). out = a·b, in = c·d."""

    w1: torch.Tensor | None = None
    w1a: torch.Tensor | None = None
    w1b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2a: torch.Tensor | None = None
    w2b: torch.Tensor | None = None

    kind: ClassVar[str] = "lokr"
    TITLE: ClassVar[str] = "LoKr"
    UPDATE: ClassVar[str] = "is a Kronecker product (rank up to rank(w1)·rank(w2)), not up @ down"
    TENSORS: ClassVar[tuple[str, ...]] = ("w1", "w1a", "w1b", "w2", "w2a", "w2b")
    NATIVE_KEYS: ClassVar[dict[str, str]] = {"w1": "lokr_w1", "w1a": "lokr_w1_a", "w1b": "lokr_w1_b",
                                             "w2": "lokr_w2", "w2a": "lokr_w2_a", "w2b": "lokr_w2_b"}
    KOHYA_KEYS: ClassVar[dict[str, str]] = NATIVE_KEYS
    KEY_SETS: ClassVar[tuple[frozenset[str], ...]] = tuple(frozenset(a + b) for a in (("w1",), ("w1a", "w1b"))
                                                           for b in (("w2",), ("w2a", "w2b")))
    NETWORK_ARGS: ClassVar[dict[str, str]] = {"algo": "lokr"}
    DIFFUSERS_READS: ClassVar[bool] = False

    def first(self) -> torch.Tensor:
        """w1 (a, c) in float64."""
        return self.w1.double() if self.w1 is not None else self.w1a.double() @ self.w1b.double()

    def second(self) -> torch.Tensor:
        """w2 as (b, d·kh·kw) in float64."""
        return self.w2.double().flatten(1) if self.w2 is not None else self.w2a.double() @ self.w2b.double()

    def alpha_rank(self) -> int | None:
        if self.w2b is not None:
            return self.w2b.shape[0]
        return self.w1b.shape[0] if self.w1b is not None else None

    @property
    def rank(self) -> int:
        """The rank of a decomposed factor; with both factors full, the trained rank (else the rank that builds full
        factors, as diffusers infers it)."""
        return self.alpha_rank() or self.trained_rank or max(self.w2.shape[:2])

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.shape is not None:
            return self.shape
        a, c = self.w1.shape if self.w1 is not None else (self.w1a.shape[0], self.w1b.shape[1])
        if self.w2 is not None:
            return (a * self.w2.shape[0], c * self.w2.shape[1], *self.w2.shape[2:])
        return (a * self.w2a.shape[0], c * self.w2b.shape[1])

    def delta_weight(self, base: torch.Tensor | None = None) -> torch.Tensor:
        """In float64, in the base weight's shape (given) or `weight_shape`."""
        return self.in_shape_of(kronecker_product(self.first(), self.second()), base)

    def scaled(self, factor: float) -> "LoKrDelta":
        if self.w1 is not None:
            return replace(self, w1=_scaled(self.w1, factor))
        return replace(self, w1a=_scaled(self.w1a, factor))

    def balanced(self) -> "LoKrDelta":
        parts = {}
        for a, b in (("w1a", "w1b"), ("w2a", "w2b")):
            if getattr(self, b) is not None:
                parts[b], parts[a] = balance_factors(getattr(self, b), getattr(self, a))
        m = replace(self, **parts)
        g1 = [m.w1] if m.w1 is not None else [m.w1a, m.w1b]
        g2 = [m.w2] if m.w2 is not None else [m.w2a, m.w2b]
        g1, g2 = equalise(g1, g2)
        names1 = ("w1",) if m.w1 is not None else ("w1a", "w1b")
        names2 = ("w2",) if m.w2 is not None else ("w2a", "w2b")
        return replace(m, **dict(zip(names1 + names2, g1 + g2)))

    @classmethod
    def from_file_tensors(cls, tensors, layout, where, **info):
        m = cls(**tensors, **info)
        pairs = [(m.w1a, m.w1b), (m.w2a, m.w2b)]
        if (m.w2 is None and m.w2b.dim() != 2) or any(a is not None and a.shape[1] != b.shape[0] for a, b in pairs):
            raise UserError(f"LoKr module {where}: factor shapes {[tuple(t.shape) for t in m.tensors().values()]} "
                            "are not LyCORIS' (Tucker form, lokr_t2, is not supported)")
        return m
