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


def upper_gram(a: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """a aᵀ (rows x rows), valid on and above the diagonal only (below it, outside the diagonal blocks: zeros), for `eigh(..., UPLO="U")`: the
    row blocks i <= j of `blocks` x `blocks`, 10/16 of the full product's multiply-adds at 4 blocks (BLAS' syrk,
    which computes one triangle, is not in torch)."""
    n = a.shape[0]
    edges = [n * i // blocks for i in range(blocks + 1)]
    g = torch.zeros(n, n, dtype=a.dtype)
    for i in range(blocks):
        rows = a[edges[i]:edges[i + 1]]
        g[edges[i]:edges[i + 1], edges[i]:] = rows @ a[edges[i]:].T
    return g


class LeftSingularBasis:
    """The left singular vectors u0_j of W0 (out x in'), for the largest |cos| of unit vectors with any of them.

    Computed without W0's SVD, from a symmetric eigendecomposition (`torch.linalg.eigh`) of the smaller Gram matrix,
    which on 2 CPU cores costs a fraction of LAPACK's SVD at SD 1.5's shapes (float64: 1280 x 5120, 0.6 s instead of
    3.8 s; 10240 x 1280, 0.9 s instead of 2.8 s):
    - wide or square W0 (out <= in'): U0 = the eigenvectors of W0 W0ᵀ (out x out), held;
    - tall W0 (out > in'): u0_j = W0 v_j / σ_j with (σ_j², v_j) the eigenpairs of W0ᵀ W0 (in' x in'), so that
      uᵀ u0_j = (W0ᵀ u)ᵀ v_j / σ_j and the out x in' matrix U0 is never formed.
    The Gram matrix's rounding, ε·σ_max² with ε = 2.2e-16, moves an eigenvector v_j by about ε·σ_max² / gap_j (gap_j:
    the distance from σ_j² to the nearest other σ_i²), and a tall W0's u0_j by σ_max / σ_j times that. Where the
    estimate passes MAX_COSINE_ERROR for any j (singular values squeezed together near zero, a rank-deficient W0)
    the full SVD is used instead. An isolated small σ_j, as random square matrices have, keeps the fast route.
    Within a repeated singular value the basis is arbitrary, as it is for any SVD routine.
    """

    MAX_COSINE_ERROR = 1e-8

    def __init__(self, w0: torch.Tensor):
        w = as_matrix(w0)
        tall = w.shape[0] > w.shape[1]
        evals, evecs = torch.linalg.eigh(upper_gram(w.T if tall else w), UPLO="U")  # σ_j², ascending
        self.route = "gram" if self._gram_error(evals, tall) <= self.MAX_COSINE_ERROR else "svd"
        if self.route == "gram":
            self._w0t = w.T if tall else None
            self._v = evecs / evals.sqrt() if tall else evecs  # tall: columns v_j / σ_j; else: U0 itself
        else:
            self._w0t, self._v = None, torch.linalg.svd(w, full_matrices=False)[0]

    @staticmethod
    def _gram_error(evals: torch.Tensor, tall: bool) -> float:
        """The largest estimated error of a cosine through the Gram route (inf for a zero or singular W0)."""
        top = float(evals[-1])
        if top <= 0 or float(evals[0]) <= 0:
            return math.inf
        if len(evals) == 1:
            return 0.0
        step = torch.diff(evals)
        gap = torch.minimum(torch.cat([step, step[-1:]]), torch.cat([step[:1], step]))  # nearest neighbour
        err = torch.finfo(torch.float64).eps * top / gap.clamp_min(1e-300)
        if tall:
            err = err * (top / evals).sqrt()
        return float(err.max())

    def max_abs_cosines(self, vectors: torch.Tensor) -> torch.Tensor:
        """(k,): for each column of `vectors` (out x k, unit norm), the largest |cos| with any u0_j."""
        vectors = vectors.to(torch.float64)
        coords = self._v.T @ (vectors if self._w0t is None else self._w0t @ vectors)  # (n, k): u0_jᵀ u
        return coords.abs().amax(dim=0)


def find_intruders(w0: torch.Tensor, delta: torch.Tensor, *, top_k: int = 10, epsilon: float = 0.5,
                   base: LeftSingularBasis | None = None) -> IntruderResult:
    """Intruder dimensions among the top-k singular vectors of W0 + ΔW (`base`: W0's basis, if cached)."""
    w0m, dm = as_matrix(w0), as_matrix(delta)
    if w0m.shape != dm.shape:
        raise ValueError(f"W0 {tuple(w0m.shape)} and ΔW {tuple(dm.shape)} differ in shape")
    u0 = LeftSingularBasis(w0m) if base is None else base
    # Only the top k of W0 + ΔW are asked: a randomised SVD on large weights (top_svd), a full one on small ones.
    u, s, vh = top_svd(w0m + dm, min(top_k, *w0m.shape))
    v = vh.T
    cos = u0.max_abs_cosines(u)
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
                       epsilon: float = 0.5, base: LeftSingularBasis | None = None) -> MitigatedModule:
    """Scale the intruder directions of W0 + up·down by `lam` and refactor the new ΔW to the same rank.

        W' = W − (1 − λ) Σ_{i ∈ intruders} σ_i u_i v_iᵀ,   ΔW' = W' − W0,   ΔW'' = rank-r SVD truncation of ΔW'

    A module without intruders, or λ = 1, keeps its factors bit for bit.
    """
    w0m = as_matrix(w0)
    u0 = LeftSingularBasis(w0m) if base is None else base
    delta = as_matrix(up) @ as_matrix(down)
    before = find_intruders(w0m, delta, top_k=top_k, epsilon=epsilon, base=u0)
    idx = before.indices
    sv_before = [float(before.singular_values[i]) for i in idx]
    if not idx or lam == 1.0:
        return MitigatedModule(down, up, before.count, before.count, sv_before, sv_before, 0.0)
    ui, si, vi = before.u[:, idx], before.singular_values[idx], before.v[:, idx]
    new_delta = delta - (1.0 - lam) * (ui * si) @ vi.T
    new_down, new_up, err = dense_to_rank(new_delta, down.shape[0])
    written = w0m + new_up @ new_down
    after = find_intruders(w0m, new_up @ new_down, top_k=top_k, epsilon=epsilon, base=u0)
    sv_after = [float(ui[:, j] @ written @ vi[:, j]) for j in range(len(idx))]
    return MitigatedModule(new_down.reshape(down.shape).to(down.dtype), new_up.reshape(up.shape).to(up.dtype),
                           before.count, after.count, sv_before, sv_after, err)


def frobenius(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(as_matrix(t)))
