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

    def row_blocks(self, sizes, where):
        """w1a's and w2a's rows cut (ΔW's rows are those rows' products, multiplied element by element); each block
        keeps the rank components either pair uses; None for a block where either product is zero."""
        out, start = [], 0
        for n in sizes:
            w1a, w2a = self.w1a[start:start + n], self.w2a[start:start + n]
            start += n
            used1, used2 = w1a.abs().sum(0) != 0, w2a.abs().sum(0) != 0
            if not (bool(used1.any()) and bool(used2.any())):
                out.append(None)
                continue
            used = used1 | used2
            out.append(replace(self, w1a=w1a[:, used], w1b=self.w1b[used], w2a=w2a[:, used], w2b=self.w2b[used],
                               **self._rows_fields(n)))
        return out

    def swapped_halves(self, where):
        """w1a's and w2a's row halves exchanged (the rank kept)."""
        return replace(self, w1a=self._halves_swapped(self.w1a), w2a=self._halves_swapped(self.w2a))

    @classmethod
    def stack_rows(cls, parts, sizes, where):
        """Each pair stacked as LoRA stacks (w1a, w2a block-diagonal, w1b, w2b stacked): row block i of both
        products is part i's, and the element-wise product keeps rows apart, so ΔW is the parts' stacked."""
        present = [p for p in parts if p is not None]
        first = present[0]
        rank = sum(p.rank for p in present)
        w1a, w2a = (first.w1a.new_zeros((sum(sizes), rank)) for _ in range(2))
        row = col = 0
        for p, n in zip(parts, sizes):
            if p is not None:
                w1a[row:row + n, col:col + p.rank], w2a[row:row + n, col:col + p.rank] = p.w1a, p.w2a
                col += p.rank
            row += n
        return replace(first, w1a=w1a, w2a=w2a, w1b=torch.cat([p.w1b for p in present]),
                       w2b=torch.cat([p.w2b for p in present]), **first._rows_fields(sum(sizes)))

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

    def _second_rows(self) -> int:
        return (self.w2 if self.w2 is not None else self.w2a).shape[0]

    def row_blocks(self, sizes, where):
        """ΔW's rows i·b .. i·b + b - 1 are w1's row i ⊗ w2 (b = w2's rows): a block of whole multiples of b is w1's
        (or w1a's) rows cut with w2 kept; a UserError naming `where` for any other cut."""
        b, out, start = self._second_rows(), [], 0
        for n in sizes:
            if n % b or start % b:
                raise UserError(f"LoKr module {where}: rows {start}-{start + n} do not fall on its Kronecker blocks of "
                                f"{b} rows, so they are no LoKr of their own")
            rows = slice(start // b, (start + n) // b)
            cut = {"w1": self.w1[rows]} if self.w1 is not None else {"w1a": self.w1a[rows]}
            out.append(replace(self, **cut, **self._rows_fields(n)))
            start += n
        return out

    @classmethod
    def stack_rows(cls, parts, sizes, where):
        """Parts sharing one second factor (w2, or w2a and w2b, and w1b) stack as w1's rows stacked: [w1_i] ⊗ w2
        is the stack of w1_i ⊗ w2. Parts with different second factors (SD3's q, k and v always) are no one
        Kronecker product: a UserError naming `where`."""
        first = parts[0]
        shared = ("w2", "w2a", "w2b", "w1b")
        if any(p is None for p in parts) or any(
                (getattr(p, k) is None) != (getattr(first, k) is None)
                or (getattr(p, k) is not None and not torch.equal(getattr(p, k), getattr(first, k)))
                for p in parts for k in shared):
            raise UserError(f"LoKr modules {where}: one kohya module holds their updates stacked, and a stack of "
                            "Kronecker products w1_i ⊗ w2_i is one Kronecker product only when every w2_i is the "
                            "same; export a merged model, or train LoKr without these modules")
        key = "w1" if first.w1 is not None else "w1a"
        return replace(first, **{key: torch.cat([getattr(p, key) for p in parts])}, **first._rows_fields(sum(sizes)))

    @classmethod
    def from_file_tensors(cls, tensors, layout, where, **info):
        m = cls(**tensors, **info)
        pairs = [(m.w1a, m.w1b), (m.w2a, m.w2b)]
        if (m.w2 is None and m.w2b.dim() != 2) or any(a is not None and a.shape[1] != b.shape[0] for a, b in pairs):
            raise UserError(f"LoKr module {where}: factor shapes {[tuple(t.shape) for t in m.tensors().values()]} "
                            "are not LyCORIS' (Tucker form, lokr_t2, is not supported)")
        return m
