"""LoRA initialisation schemes as plain functions on tensors.

Each returns `(A, B, offset)` for a base weight flattened to a matrix W (out x k), where k = in (Linear)
or in·kh·kw (Conv): A is (r x k), B is (out x r), and `offset` is the matrix `s0·B0·A0` to subtract from
the base weight (None where the scheme leaves the base untouched). In every scheme the adapted layer's
output at step 0 equals the base layer's: `(W - offset) + s0·B·A == W`.
"""

from __future__ import annotations

import math

import torch

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


def init_orthonormal(weight: torch.Tensor, rank: int, scale: float, gen: torch.Generator):
    """A with orthonormal rows (every singular value 1), B = 0: the frozen A of LoRA-FA as Shuttleworth et al.
    2024 ("LoRA vs full fine-tuning: an illusion of equivalence", section 6) set it, where training only B left
    fewer intruder dimensions. Needs r <= k (at most k orthonormal rows in k dimensions)."""
    out, k = weight.shape
    q = torch.linalg.qr(torch.randn(k, rank, generator=gen, dtype=torch.float64)).Q.T  # (r, k), Q Qᵀ = I
    return q, torch.zeros(out, rank, dtype=torch.float64), None


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


SCHEMES = {"zero": init_zero, "orthogonal": init_orthogonal, "orthonormal": init_orthonormal, "compensated": init_compensated, "principal": init_principal}


def max_rank(scheme: str, out: int, k: int) -> int | None:
    """The largest rank `scheme` can build for an (out x k) weight; None where any rank works.

    orthogonal: A = [Q; Q] needs Q's r//2 rows orthonormal in k dimensions, so r//2 <= k.
    orthonormal: r orthonormal rows exist in k dimensions only for r <= k.
    principal: the top-r singular triplets of W exist only for r <= min(out, k); beyond, the extra rank
    would be zero rows of A and columns of B that never receive a gradient.
    """
    if scheme == "orthogonal":
        return 2 * k + 1
    if scheme == "principal":
        return min(out, k)
    if scheme == "orthonormal":
        return k
    return None


def initialise(scheme: str, weight: torch.Tensor, rank: int, scale: float, gen: torch.Generator):
    """Dispatch on the scheme name; `weight` is the base weight flattened to (out, k)."""
    return SCHEMES[scheme](weight.detach().to(torch.float64), rank, scale, gen)


# ------------------------------------------------------------------------------------------- LyCORIS kinds
# Which inits LoHa and LoKr allow, and why, is the config's table (config.LYCORIS_INITS): validation reads it
# without importing torch.


def _normal(shape, std: float, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64) * std


def init_loha(scheme: str, out: int, k: int, rank: int, gen: torch.Generator):
    """(w1a (out, r), w1b (r, k), w2a (out, r), w2b (r, k)) in float64 with (w1a @ w1b) ⊙ (w2a @ w2b) = 0.

    zero (LyCORIS' init): w1a ~ N(0, 0.1²), w1b and w2b ~ N(0, 1), w2a = 0. Only w2a gets a gradient at the first
    step (as LoRA's A gets none until B moves).
    orthogonal: w2a = [P | -P], w2b = [Q; Q] with Q's rows orthonormal and scaled to unit-size entries, so w2a @ w2b
    = P·Q - P·Q = 0 (up to the rounding of one matrix product) while both w2 factors get a gradient from the first step (w1a and w1b still get none until
    w2a @ w2b moves: their gradient is the output gradient ⊙ w2a @ w2b). For odd r the spare row of w2b is random and
    the spare column of w2a zero; r = 1 is the zero init.
    """
    w1a, w1b = _normal((out, rank), 0.1, gen), _normal((rank, k), 1.0, gen)
    half = rank // 2 if scheme == "orthogonal" else 0
    if half == 0:
        return w1a, w1b, torch.zeros(out, rank, dtype=torch.float64), _normal((rank, k), 1.0, gen)
    q = torch.linalg.qr(torch.randn(k, half, generator=gen, dtype=torch.float64)).Q.T * math.sqrt(k)
    p = _normal((out, half), 0.1, gen)
    w2a, w2b = torch.cat([p, -p], 1), torch.cat([q, q], 0)
    if rank % 2:
        w2a = torch.cat([w2a, torch.zeros(out, 1, dtype=torch.float64)], 1)
        w2b = torch.cat([w2b, _normal((1, k), 1.0, gen)], 0)
    return w1a, w1b, w2a, w2b


def init_lokr(w1_shape: tuple[int, int], w2_shape: tuple[int, ...], rank: int, decompose_w1: bool, decompose_w2: bool,
              gen: torch.Generator) -> dict[str, torch.Tensor]:
    """LoKr's factors in float64, as LyCORIS starts them: w1 (a, c) kaiming-uniform (U(±1/sqrt(c)), or w1a (a, r) and
    w1b (r, c) both so); w2 (b, d[, kh, kw]) = 0, or w2a (b, r) kaiming-uniform and w2b (r, d·kh·kw) = 0. So
    ΔW = w1 ⊗ w2 = 0 exactly; w2 (or w2b) gets a gradient at the first step, w1 none until w2 moves."""
    (a, c), (b, *rest) = w1_shape, w2_shape
    if decompose_w1:
        out = {"lokr_w1_a": _uniform((a, rank), 1 / math.sqrt(rank), gen), "lokr_w1_b": _uniform((rank, c), 1 / math.sqrt(c), gen)}
    else:
        out = {"lokr_w1": _uniform((a, c), 1 / math.sqrt(c), gen)}
    if decompose_w2:
        out |= {"lokr_w2_a": _uniform((b, rank), 1 / math.sqrt(rank), gen),
                "lokr_w2_b": torch.zeros(rank, math.prod(rest), dtype=torch.float64)}
    else:
        out["lokr_w2"] = torch.zeros(b, *rest, dtype=torch.float64)
    return out
