"""LoRA initialisation schemes as plain functions on tensors.

Each returns `(A, B, offset)` for a base weight flattened to a matrix W (out x k), where k = in (Linear)
or in·kh·kw (Conv): A is (r x k), B is (out x r), and `offset` is the matrix `s0·B0·A0` to subtract from
the base weight (None where the scheme leaves the base untouched). In every scheme the adapted layer's
output at step 0 equals the base layer's: `(W - offset) + s0·B·A == W`.
"""

from __future__ import annotations

import math

import torch

INIT_SCHEMES = ("zero", "orthogonal", "compensated", "principal")


def _uniform(shape, bound: float, gen: torch.Generator) -> torch.Tensor:
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound


def random_a(rank: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform with a = sqrt(5), as torch's Linear and peft use: U(-1/sqrt(k), 1/sqrt(k))."""
    return _uniform((rank, k), 1.0 / math.sqrt(k), gen)


def random_b(out: int, rank: int, gen: torch.Generator) -> torch.Tensor:
    return _uniform((out, rank), 1.0 / math.sqrt(rank), gen)


def init_zero(weight: torch.Tensor, rank: int, scale: float, gen: torch.Generator):
    out, k = weight.shape
    return random_a(rank, k, gen), torch.zeros(out, rank, dtype=torch.float64), None


def init_orthogonal(weight: torch.Tensor, rank: int, scale: float, gen: torch.Generator):
    """A = [Q; Q], B = [P | -P], so B·A = P·Q - P·Q = 0 exactly while both receive gradient.

    Q has orthonormal rows (scaled to A's usual magnitude). For odd r the spare row of A is random and
    the spare column of B is zero, which keeps B·A = 0.
    """
    out, k = weight.shape
    half = rank // 2
    if half == 0:  # rank 1 cannot be split: fall back to a zero B
        return init_zero(weight, rank, scale, gen)
    g = torch.randn(k, half, generator=gen, dtype=torch.float64)
    q = torch.linalg.qr(g).Q.T * (1.0 / math.sqrt(k)) * math.sqrt(3.0)  # rows orthogonal, kaiming-like size
    p = random_b(out, half, gen)
    a = torch.cat([q, q], 0)
    b = torch.cat([p, -p], 1)
    if rank % 2:
        a = torch.cat([a, random_a(1, k, gen)], 0)
        b = torch.cat([b, torch.zeros(out, 1, dtype=torch.float64)], 1)
    return a, b, None


def init_compensated(weight: torch.Tensor, rank: int, scale: float, gen: torch.Generator):
    """A and B random; the base weight is offset by s0·B0·A0 so the sum is unchanged."""
    out, k = weight.shape
    a, b = random_a(rank, k, gen), random_b(out, rank, gen)
    return a, b, scale * (b @ a)


def init_principal(weight: torch.Tensor, rank: int, scale: float, gen: torch.Generator):
    """PiSSA: A, B from the top-r singular triplets of W, sized so s0·B0·A0 = U_r S_r V_rᵀ; base offset by it."""
    w = weight.to(torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    r = min(rank, s.numel())
    root = torch.sqrt(s[:r] / scale)
    a = torch.zeros(rank, w.shape[1], dtype=torch.float64)
    b = torch.zeros(w.shape[0], rank, dtype=torch.float64)
    a[:r] = root[:, None] * vh[:r]
    b[:, :r] = u[:, :r] * root[None, :]
    return a, b, scale * (b @ a)


SCHEMES = {"zero": init_zero, "orthogonal": init_orthogonal, "compensated": init_compensated, "principal": init_principal}


def max_rank(scheme: str, out: int, k: int) -> int | None:
    """The largest rank `scheme` can build for an (out x k) weight; None where any rank works.

    orthogonal: A = [Q; Q] needs Q's r//2 rows orthonormal in k dimensions, so r//2 <= k.
    principal: the top-r singular triplets of W exist only for r <= min(out, k); beyond, the extra rank
    would be zero rows of A and columns of B that never receive a gradient.
    """
    if scheme == "orthogonal":
        return 2 * k + 1
    if scheme == "principal":
        return min(out, k)
    return None


def initialise(scheme: str, weight: torch.Tensor, rank: int, scale: float, gen: torch.Generator):
    """Dispatch on the scheme name; `weight` is the base weight flattened to (out, k)."""
    return SCHEMES[scheme](weight.detach().to(torch.float64), rank, scale, gen)
