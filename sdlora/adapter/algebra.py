"""Adapter algebra: plain tensor maths on low-rank updates and on models, shared by export, inspect and merging.

- `factored_svd` / `factor_to_rank` / `factored_singular_values`: the SVD of up @ down without forming it
  (QR of both factors, SVD of the r x r core), and the best rank-r refactoring of it (Eckart-Young).
- `dense_to_rank` / `top_svd`: the best rank-r factors of a dense matrix (randomised SVD where r is small).
- `balance_factors`: the same product with each rank component's magnitude split evenly between the factors.
- `concat_factors`: a weighted sum of several updates as one exact adapter (rank = sum of ranks).
- `rank_for`: the rank a resize keeps (fixed, or kohya's sv_ratio / sv_fro / sv_cumulative rules) and
  `retained_fro`: the share of ‖ΔW‖_F that rank keeps.
- `fisher_average_factors`: the Fisher-weighted average of several updates, per output row, as one exact adapter
  (Matena & Raffel 2022); `fisher_to_rank` / `fisher_singular_values`: FWSVD (Hsu et al. 2022), the rank-r
  factors that minimise the row-Fisher-weighted error.
- `find_module` / `component_module` / `merge_adapter`: an adapter's modules in a model (or in the model of their
  component), and W += ΔW in place.

Everything is computed in float64; conv factors are flattened to matrices and reshaped back.
"""

from __future__ import annotations

import contextlib
import math

import torch

from sdlora.adapter.names import model_level, split_name
from sdlora.errors import UserError

# Below this fraction of ‖up‖_F·‖down‖_F a singular value of up @ down is rounding, not update: fp32 factors
# carry ~1e-7 relative error, and offset-init exports [s·B | -s0·B0]·[A; A0] of an untrained module cancel to ~1e-15.
ZERO_TOLERANCE = 1e-6


def as_matrix(w: torch.Tensor) -> torch.Tensor:
    """(out, in) or (out, in, kh, kw) -> (out, in·kh·kw) in float64."""
    return w.detach().reshape(w.shape[0], -1).to(torch.float64)


def factored_svd(down: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) of up @ down (out x in', in float64) from the factors: down (r, in, ...), up (out, r, ...)."""
    d2, u2 = down.flatten(1).double(), up.flatten(1).double()
    qu, ru = torch.linalg.qr(u2)
    qd, rd = torch.linalg.qr(d2.T)
    uu, s, vh = torch.linalg.svd(ru @ rd.T)
    return qu @ uu, s, vh @ qd.T


def factor_to_rank(down: torch.Tensor, up: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`rank` factorisation of up @ down, split √σ each side, in fp32 and the factors' shapes; returns
    (down, up, relative Frobenius error of the truncation). A rank above the product's own pads zero components."""
    u, s, vh = factored_svd(down, up)
    total = torch.linalg.norm(s)
    err = float(torch.linalg.norm(s[rank:]) / total) if total > 0 else 0.0
    root = torch.sqrt(s[:rank])
    new_up, new_down = _pad_rank(u[:, :rank] * root, root[:, None] * vh[:rank], rank)
    return (new_down.reshape(rank, *down.shape[1:]).float(), new_up.reshape(up.shape[0], rank, *up.shape[2:]).float(), err)


def _pad_rank(up: torch.Tensor, down: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, k), (k, in') -> (out, rank), (rank, in') with zero components added where k < rank."""
    k = down.shape[0]
    if k < rank:
        up = torch.cat([up, up.new_zeros(up.shape[0], rank - k)], 1)
        down = torch.cat([down, down.new_zeros(rank - k, down.shape[1])], 0)
    return up, down


def concat_factors(parts: list[tuple[torch.Tensor, torch.Tensor]], weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ w_i · up_i @ down_i as one adapter, exactly: down = [down_1; down_2; ...], up = [w_1·up_1 | w_2·up_2 | ...]
    (rank = the sum of the ranks). Computed in float64, returned in fp32 and the factors' shapes."""
    shapes = {(u.shape[0], *d.shape[1:], *u.shape[2:]) for d, u in parts}
    if len(shapes) != 1:
        raise ValueError(f"updates of different shapes cannot be summed: {sorted(shapes)}")
    down = torch.cat([d.double() for d, _ in parts], 0)
    up = torch.cat([w * u.double() for (_, u), w in zip(parts, weights)], 1)
    return down.float(), up.float()


# A row whose Fisher is exactly zero still needs a direction in FWSVD's weighted SVD: each row's Fisher is raised by
# FISHER_FLOOR · mean(F) (the role of Matena & Raffel's `fisher_floor`), far below any measured row, so it only
# decides what the weighted objective leaves free.
FISHER_FLOOR = 1e-6


def _row_scale(fisher: torch.Tensor, out: int) -> torch.Tensor:
    """sqrt(F + floor) as a float64 (out,) vector; uniform where the module's Fisher is all zero."""
    f = fisher.double().reshape(-1)
    if f.numel() != out:
        raise ValueError(f"row Fisher of {f.numel()} values for an update of {out} output rows")
    mean = float(f.mean())
    return torch.sqrt(f + FISHER_FLOOR * mean) if mean > 0 else torch.ones_like(f)


def fisher_coefficients(weights: list[float], fishers: list[torch.Tensor]) -> torch.Tensor:
    """c_ij = λ_i F_i[j] / Σ_k λ_k F_k[j] (float64, (n, out)): the Fisher-weighted average's share of update i in
    output row j (Matena & Raffel 2022, eq. 2, with row Fishers); a row where every F_i[j] is 0 takes the plain
    average λ_i / Σ λ_k. weights λ_i > 0; fishers: (out,) each."""
    lam = torch.tensor(weights, dtype=torch.float64)[:, None]
    f = torch.stack([fi.double().reshape(-1) for fi in fishers])
    num = lam * f
    den = num.sum(0, keepdim=True)
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), (lam / lam.sum()).expand_as(num))


def fisher_average_factors(parts: list[tuple[torch.Tensor, torch.Tensor]], weights: list[float],
                           fishers: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The Fisher-weighted average (Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging", eq. 2,
    with the row-wise Fisher of each update) of updates up_i @ down_i, per output row j:

        ΔW[j] = Σ_i c_ij · ΔW_i[j],   c_ij = λ_i F_i[j] / Σ_k λ_k F_k[j]     (`fisher_coefficients`)

    As the c_ij scale rows of each `up`, the result is exact in factored form: down = [down_1; down_2; ...],
    up = [c_1 ⊙ up_1 | c_2 ⊙ up_2 | ...] (rank = the sum of the ranks). Computed in float64, returned in fp32 and the
    factors' shapes; a ValueError when the shapes differ."""
    out = parts[0][1].shape[0]
    if any(f.numel() != out for f in fishers):
        raise ValueError(f"row Fishers of {sorted({f.numel() for f in fishers})} values for {out} output rows")
    c = fisher_coefficients(weights, fishers)
    return concat_factors([(d, (ci.reshape(-1, *([1] * (u.dim() - 1))) * u.double()).float())
                           for (d, u), ci in zip(parts, c)], [1.0] * len(parts))


def fisher_dense_to_rank(delta: torch.Tensor, fisher: torch.Tensor,
                         rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """`fisher_to_rank` for a dense (out, in') update: X_r = X V_r V_rᵀ with V_r from `top_svd(D X)`; returns
    (down (rank, in'), up (out, rank), both float64; the Fisher-weighted and the plain relative error, measured)."""
    x = delta.double()
    d = _row_scale(fisher, x.shape[0])[:, None]
    _, _, vh = top_svd(d * x, min(rank, *x.shape))
    up = x @ vh.T
    approx = up @ vh
    err_w = _relative(d * x, d * approx)
    err = _relative(x, approx)
    up, down = _pad_rank(up, vh, rank)
    down, up = balance_factors(down, up)
    return down, up, err_w, err


def _relative(x: torch.Tensor, approx: torch.Tensor) -> float:
    total = torch.linalg.vector_norm(x)
    return float(torch.linalg.vector_norm(x - approx) / total) if total > 0 else 0.0


def fisher_singular_values(down: torch.Tensor, up: torch.Tensor, fisher: torch.Tensor) -> torch.Tensor:
    """Singular values of diag(sqrt(F)) · up @ down (FWSVD's weighted update), from the factors; fisher: (out,)."""
    d = _row_scale(fisher, up.shape[0])
    return factored_singular_values(down, d.reshape(-1, *([1] * (up.dim() - 1))) * up.double())


def fisher_to_rank(down: torch.Tensor, up: torch.Tensor, fisher: torch.Tensor,
                   rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """FWSVD (Hsu et al., ICLR 2022, "Language model compression with weighted low-rank factorization"): the
    rank-`rank` update X_r minimising ‖diag(sqrt(F)) (X - X_r)‖_F for X = up @ down, F the row Fisher (out,).

    With D = diag(sqrt(F)) and V_r the top right singular vectors of D·X, D·X_r is D·X's best rank-r part, so
    X_r = D⁻¹(D X V_r V_rᵀ) = X V_r V_rᵀ: each row projected on V_r, with no division by a small Fisher. Returned as
    balanced factors (down (rank, in, ...), up (out, rank, ...), fp32; zero components pad a rank above X's own),
    the Fisher-weighted relative error ‖D(X - X_r)‖_F / ‖D X‖_F and the plain one ‖X - X_r‖_F / ‖X‖_F.
    Uniform F gives the plain truncation (`factor_to_rank`'s product); r >= rank(X) gives X (to rounding)."""
    d = _row_scale(fisher, up.shape[0])
    x_down, x_up = down.flatten(1).double(), up.flatten(1).double()
    _, s, vh = factored_svd(x_down, d[:, None] * x_up)
    k = min(rank, vh.shape[0])
    v = vh[:k]  # (k, in')
    new_up = x_up @ (x_down @ v.T)  # X V_r: (out, k)
    total_w = float(torch.linalg.norm(s))
    err_w = float(torch.linalg.norm(s[k:]) / total_w) if total_w > 0 else 0.0
    total = float(torch.sqrt(((x_up.T @ x_up) * (x_down @ x_down.T)).sum().clamp_min(0)))  # ‖up @ down‖_F
    kept = float(torch.linalg.vector_norm(new_up))  # ‖X V_r‖_F = ‖X_r‖_F, a projection of X's rows
    err = math.sqrt(max(total**2 - kept**2, 0.0)) / total if total > 0 else 0.0
    new_up, v = _pad_rank(new_up, v, rank)
    new_down, new_up = balance_factors(v, new_up)
    return (new_down.reshape(rank, *down.shape[1:]).float(), new_up.reshape(up.shape[0], rank, *up.shape[2:]).float(),
            err_w, err)


RANK_RULES = ("rank", "sv_ratio", "sv_fro", "sv_cumulative")


def rank_for(s: torch.Tensor, rule: str, value: float, max_rank: int | None = None) -> int:
    """The rank a resize keeps of singular values `s` (descending), as kohya's resize_lora.py chooses it:

    - rank: `value` components;
    - sv_ratio: every σ_i >= σ_max / value;
    - sv_fro: the fewest components whose Σσ² reaches value² · Σσ² (the Frobenius norm's share `value`);
    - sv_cumulative: the fewest components whose Σσ reaches value · Σσ.

    At least 1, at most `max_rank` (if given) and never more than the non-zero singular values (a zero update: 1).
    """
    s = s.double()
    nonzero = int((s > 0).sum())
    if rule == "rank":
        k = int(value)
    elif nonzero == 0:
        k = 1
    elif rule == "sv_ratio":
        k = int((s >= s[0] / value).sum())
    elif rule in ("sv_fro", "sv_cumulative"):
        w = s**2 if rule == "sv_fro" else s
        target = (value**2 if rule == "sv_fro" else value) * w.sum()
        # 1e-12 relative slack: a share of exactly 1 must not ask for a component that rounding left out
        k = int((torch.cumsum(w, 0) < target * (1 - 1e-12)).sum()) + 1
    else:
        raise ValueError(f"rank rule {rule!r}: allowed {', '.join(RANK_RULES)}")
    if rule != "rank":
        k = min(k, nonzero)
    if max_rank is not None:
        k = min(k, max_rank)
    return max(k, 1)


def retained_fro(s: torch.Tensor, k: int) -> float:
    """‖rank-k truncation‖_F / ‖ΔW‖_F = sqrt(Σ_{i<k} σ_i² / Σ σ_i²); 1 for a zero update."""
    s = s.double()
    total = float((s**2).sum())
    return math.sqrt(float((s[:k] ** 2).sum()) / total) if total > 0 else 1.0


def factored_singular_values(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Singular values of up @ down without forming it; those below ZERO_TOLERANCE · ‖up‖_F · ‖down‖_F are 0."""
    u2, d2 = as_matrix(up), as_matrix(down)
    _, ru = torch.linalg.qr(u2)
    _, rd = torch.linalg.qr(d2.T)
    s = torch.linalg.svdvals(ru @ rd.T)
    tol = ZERO_TOLERANCE * torch.linalg.vector_norm(u2) * torch.linalg.vector_norm(d2)
    return torch.where(s > tol, s, torch.zeros_like(s))


# Randomised SVD (Halko, Martinsson & Tropp 2011, algorithms 4.4 and 5.1) for the top `rank` components when they are
# a small part of the spectrum: a range finder with OVERSAMPLE extra columns and POWER_ITERATIONS subspace-iteration
# passes, then the SVD of the matrix projected on that range. Its error shrinks like (σ_{k+p}/σ_k)^(2q+1); on a
# weight-like spectrum σ_i = 1/(1 + i/10) (ratio 1.5 at p = 20) it would be 1e-12 relative in float64 (10 + 4 passes:
# 5e-5). Cost O(out·in·(k+p)·q) instead of the full SVD's O(out·in·min(out, in)). The range finder runs in float32
# (on 2 CPU cores 4x faster than float64 at SD 1.5's shapes: 0.4 s instead of 1.3 s for a 10240 x 1280 weight) and
# the projection and its SVD in float64 (Rayleigh–Ritz): the triplets are exact float64 singular triplets of the
# matrix restricted to a range that float32 rounding leaves off by ~1e-7, so that is the floor of the error, and an
# update of rank <= k is found to ~1e-7 relative.
OVERSAMPLE, POWER_ITERATIONS = 20, 8


def top_svd(m: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_k, S_k, Vh_k) of a float64 matrix (out x in): U_k (out, k), S_k (k,) descending, Vh_k (k, in); randomised
    where k + OVERSAMPLE < min(shape) / 2, else the full SVD. The random draw is seeded, so the same matrix always
    gives the same factors."""
    q = k + OVERSAMPLE
    if q >= min(m.shape) / 2:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return u[:, :k], s[:k], vh[:k]
    m32 = m.to(torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        sketch = torch.randn(m.shape[1], q, dtype=torch.float32)
    basis = torch.linalg.qr(m32 @ sketch).Q
    for _ in range(POWER_ITERATIONS):  # re-orthonormalised each half pass, against float32's loss of the small σ
        basis = torch.linalg.qr(m32 @ torch.linalg.qr(m32.T @ basis).Q).Q
    basis = torch.linalg.qr(basis.to(torch.float64)).Q
    ub, s, vh = torch.linalg.svd(basis.T @ m, full_matrices=False)
    return (basis @ ub)[:, :k], s[:k], vh[:k]


def dense_to_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`rank` factors (down (rank, in'), up (out, rank)) of a dense matrix, split √σ each side, and the
    relative Frobenius error ‖delta - up·down‖_F / ‖delta‖_F (measured, so it holds whichever SVD `top_svd` ran)."""
    delta = delta.double()
    u, s, vh = top_svd(delta, min(rank, *delta.shape))
    root = s.sqrt()
    up, down = _pad_rank(u * root, root[:, None] * vh, rank)
    total = torch.linalg.vector_norm(delta)
    err = float(torch.linalg.vector_norm(delta - up @ down) / total) if total > 0 else 0.0
    return down, up, err


def balance_factors(down: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same product up @ down with each rank component's column of `up` and row of `down` scaled to equal norms.

    With the scale folded into `up`, a small scale (rank 32, alpha 1: 1/32) times a young B puts `up` deep in
    fp16's subnormal range, where it keeps only a few significant bits. Splitting each component's magnitude
    evenly between the factors puts both near the geometric mean of their norms, so a 16-bit file keeps 16-bit
    precision; and, unlike a kohya `.alpha`, it needs nothing from the loader (diffusers ignores per-module alphas
    of attention and text-encoder modules, and offset-init exports carry two scales in one module). Computed in
    float64; components with a zero factor are left as they are.
    """
    d, u = down.flatten(1).double(), up.flatten(1).double()
    nd, nu = torch.linalg.vector_norm(d, dim=1), torch.linalg.vector_norm(u, dim=0)
    k = torch.where((nd > 0) & (nu > 0), torch.sqrt(nd / nu.clamp_min(1e-300)), torch.ones_like(nd))
    return (d / k[:, None]).reshape(down.shape).to(down.dtype), (u * k).reshape(up.shape).to(up.dtype)


def find_module(model: torch.nn.Module, name: str, *, where: str = "the base model") -> torch.nn.Module:
    """The module of canonical name `name` (`<part>.<path>`, adapter/names.py) in that part's model, with or
    without the part's model level (transformers 4's `text_model.`); a UserError naming it when the model has none."""
    component, path = split_name(name)
    level = model_level(component)
    candidates = [path] + ([level + path] if level else [])
    for p in candidates:
        with contextlib.suppress(AttributeError):
            module = model.get_submodule(p)
            if isinstance(getattr(module, "weight", None), torch.Tensor):
                return module
    raise UserError(f"adapter module {name} does not exist in {where} (a different base model?)")


def component_module(models: dict[str, torch.nn.Module], name: str, *, where: str = "the base model") -> torch.nn.Module:
    """`find_module` in the model of `name`'s component; `models`: each component's model by name
    (`Components.adaptable()`: the family's denoiser and text encoders). A UserError naming the module when
    `where` has no such component (an adapter for another family) or no such module."""
    component = split_name(name)[0]
    if component not in models:
        raise UserError(f"adapter module {name}: {where} has no {component} (an adapter for another model family?)")
    return find_module(models[component], name, where=where)


@torch.no_grad()
def merge_adapter(adapter, models: dict[str, torch.nn.Module], *, where: str = "the base model") -> None:
    """W += ΔW for every module, in place, computed in float64 so the merge adds no rounding of its own. `models`:
    the model of each component by name (`Components.adaptable()`: the family's denoiser and text encoders)."""
    for name, delta in adapter.modules.items():
        weight = component_module(models, name, where=where).weight
        dw = delta.delta_weight(weight).to(torch.float64)
        if dw.shape != weight.shape:
            raise UserError(f"adapter module {name}: update of shape {tuple(dw.shape)} does not fit the base weight "
                            f"{tuple(weight.shape)} (wrong --base?)")
        weight.copy_((weight.to(torch.float64) + dw).to(weight.dtype))
