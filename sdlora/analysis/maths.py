"""What an update ΔW did to a weight W0, as plain float64 tensor functions (no models, no files).

Intruder dimensions ("LoRA vs Full Fine-tuning: An Illusion of Equivalence", arXiv 2410.21228): among
the top-k left singular vectors u_j of W = W0 + ΔW, those whose largest |cos| with any left singular
vector of W0 is below ε. They are new high-ranking directions that W0 never had; the paper finds they
carry LoRA's forgetting, and that scaling their singular values down reduces it.

Conv weights are flattened to (out, in·kh·kw) before any SVD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sdlora.adapter.algebra import as_matrix, dense_to_rank, top_svd


def effective_rank(singular_values: torch.Tensor) -> float:
    """exp of the entropy of the normalised singular values (Roy & Vetterli); 0 for a zero matrix."""
    s = singular_values.to(torch.float64).clamp_min(0)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def max_abs_cosines(vectors: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """For each column of `vectors` (unit norm), the largest |cos| with any column of `basis` (unit norm)."""
    return (vectors.T @ basis).abs().amax(dim=1)


@dataclass
class IntruderResult:
    """Top-k spectrum of W = W0 + ΔW and which of its left singular vectors are intruders."""

    singular_values: torch.Tensor  # (k,) of W, descending
    u: torch.Tensor  # (out, k) left singular vectors of W
    v: torch.Tensor  # (in', k) right singular vectors of W
    max_cosine: torch.Tensor  # (k,) largest |cos| of each u_j with any left singular vector of W0
    is_intruder: torch.Tensor  # (k,) bool

    @property
    def count(self) -> int:
        return int(self.is_intruder.sum())

    @property
    def indices(self) -> list[int]:
        return [int(i) for i in torch.nonzero(self.is_intruder).flatten()]


def left_singular_vectors(w0: torch.Tensor) -> torch.Tensor:
    """Thin U of W0 (out x min(out, in')); computed once per base weight and reusable across adapters."""
    u, _, _ = torch.linalg.svd(as_matrix(w0), full_matrices=False)
    return u


def find_intruders(w0: torch.Tensor, delta: torch.Tensor, *, top_k: int = 10, epsilon: float = 0.5,
                   base_u: torch.Tensor | None = None) -> IntruderResult:
    """Intruder dimensions among the top-k singular vectors of W0 + ΔW (`base_u`: W0's thin U, if cached)."""
    w0m, dm = as_matrix(w0), as_matrix(delta)
    if w0m.shape != dm.shape:
        raise ValueError(f"W0 {tuple(w0m.shape)} and ΔW {tuple(dm.shape)} differ in shape")
    u0 = left_singular_vectors(w0m) if base_u is None else base_u
    # Only the top k of W0 + ΔW are asked: a randomised SVD on large weights (top_svd), a full one on small ones.
    u, s, vh = top_svd(w0m + dm, min(top_k, *w0m.shape))
    v = vh.T
    cos = max_abs_cosines(u, u0)
    return IntruderResult(s, u, v, cos, cos < epsilon)


@dataclass
class MitigatedModule:
    down: torch.Tensor  # new factors, shaped like the input factors (rank unchanged), input dtype
    up: torch.Tensor
    intruders_before: int
    intruders_after: int
    singular_values_before: list[float]  # σ_i of each intruder direction in W0 + ΔW
    singular_values_after: list[float]  # u_iᵀ (W0 + ΔW'') v_i: the same directions in the written weight
    truncation_error: float  # ‖ΔW' − ΔW''‖_F / ‖ΔW'‖_F (ΔW'' = the rank-r refactoring)


def mitigate_intruders(w0: torch.Tensor, down: torch.Tensor, up: torch.Tensor, lam: float, *, top_k: int = 10,
                       epsilon: float = 0.5, base_u: torch.Tensor | None = None) -> MitigatedModule:
    """Scale the intruder directions of W0 + up·down by `lam` and refactor the new ΔW to the same rank.

        W' = W − (1 − λ) Σ_{i ∈ intruders} σ_i u_i v_iᵀ,   ΔW' = W' − W0,   ΔW'' = rank-r SVD truncation of ΔW'

    A module without intruders, or λ = 1, keeps its factors bit for bit.
    """
    w0m = as_matrix(w0)
    u0 = left_singular_vectors(w0m) if base_u is None else base_u
    delta = as_matrix(up) @ as_matrix(down)
    before = find_intruders(w0m, delta, top_k=top_k, epsilon=epsilon, base_u=u0)
    idx = before.indices
    sv_before = [float(before.singular_values[i]) for i in idx]
    if not idx or lam == 1.0:
        return MitigatedModule(down, up, before.count, before.count, sv_before, sv_before, 0.0)
    ui, si, vi = before.u[:, idx], before.singular_values[idx], before.v[:, idx]
    new_delta = delta - (1.0 - lam) * (ui * si) @ vi.T
    new_down, new_up, err = dense_to_rank(new_delta, down.shape[0])
    written = w0m + new_up @ new_down
    after = find_intruders(w0m, new_up @ new_down, top_k=top_k, epsilon=epsilon, base_u=u0)
    sv_after = [float(ui[:, j] @ written @ vi[:, j]) for j in range(len(idx))]
    return MitigatedModule(new_down.reshape(down.shape).to(down.dtype), new_up.reshape(up.shape).to(up.dtype),
                           before.count, after.count, sv_before, sv_after, err)


def frobenius(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(as_matrix(t)))


def finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None
