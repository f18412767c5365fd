"""`sdlora merge A B ... --out M [--weights w_A w_B ...] [--method concat|svd|fisher] [--rank R]`: adapters as one.

concat: ΔW = Σ w_i ΔW_i exactly, as one adapter of rank Σ r_i (`algebra.concat_factors`).
svd: the same weighted sum re-factored to rank R (Eckart-Young, from the factors: `algebra.factor_to_rank`);
the relative Frobenius error of each module is reported.
fisher: per output row j, the Fisher-weighted average ΔW[j] = Σ_i c_ij ΔW_i[j], c_ij = w_i F_i[j] / Σ_k w_k F_k[j]
(Matena & Raffel 2022; `algebra.fisher_average_factors`), re-factored to rank R by FWSVD with the row Fisher
Σ_i w_i F_i (Hsu et al. 2022; `algebra.fisher_to_rank`); each module's Fisher-weighted and plain errors are
reported. F_i is each adapter's stored row Fisher (`adapter.fisher`) or, with --fisher-data, estimated with --base.
A module that only some adapters have is combined over those that have it.

DoRA, LoHa, LoKr: their updates are not up @ down (DoRA's m ⊙ V/‖V‖ − W0 depends on W0; LoHa's Hadamard and
LoKr's Kronecker products can have any rank), and a sum of them is not one of them, so concat (which promises
exactness) refuses them; svd and fisher combine the modules' dense updates (`delta_weight`, with W0 from --base
where a DoRA needs it) and factor the result as a plain LoRA of rank R (`algebra.dense_to_rank`,
`algebra.fisher_dense_to_rank`), with the measured error.
"""

from __future__ import annotations

from pathlib import Path

from sdlora.adapter.algebra import (concat_factors, dense_to_rank, factor_to_rank, fisher_average_factors,
                                    fisher_coefficients, fisher_dense_to_rank, fisher_to_rank)
from sdlora.adapter.io import load_adapter
from sdlora.adapter.weights import AdapterWeights, ModuleDelta
from sdlora.commands.adapter_output import (DEFAULT_FISHER_SAMPLES, adapter_fishers, base_weights, carried_metadata,
                                           check_output, module_table, write_adapter)
from sdlora.errors import UserError

METHODS = ("concat", "svd", "fisher")


def merge_adapters(adapters: list[AdapterWeights], weights: list[float], method: str = "concat",
                   rank: int | None = None, fishers: list | None = None,
                   base_weight=None) -> tuple[AdapterWeights, list[dict]]:
    """The merged adapter and one report row per module (name, ranks in and out, relative error of svd / fisher;
    fisher also its Fisher-weighted error). fishers: one `RowFisher` per adapter (method fisher). base_weight:
    name -> W0, needed where a module is a DoRA. A module of a kind that is not up @ down (DoRA, LoHa, LoKr) has
    its dense update combined (concat refuses it)."""
    names = sorted({n for a in adapters for n in a.modules})
    modules, rows = {}, []
    for name in names:
        idx = [i for i, a in enumerate(adapters) if name in a.modules]
        mods, ws = [adapters[i].modules[name] for i in idx], [weights[i] for i in idx]
        fs = [fishers[i].modules[name] for i in idx] if method == "fisher" else None
        row = {"name": name, "ranks_in": "+".join(str(m.rank) for m in mods), "relative_error": 0.0,
               "fisher_error": None}
        try:
            if not all(m.FACTORED for m in mods):
                down, up = _dense_merge(name, mods, ws, fs, method, rank, base_weight, row)
            else:
                down, up = _factored_merge(mods, ws, fs, method, rank, row)
        except ValueError as e:
            raise UserError(f"merge: module {name}: {e} (adapters for different base models?)") from None
        modules[name] = ModuleDelta(down, up)
        rows.append({**row, "rank": down.shape[0]})
    return AdapterWeights(modules), rows


def _factored_merge(mods, ws, fs, method, rank, row):
    parts = [(m.down, m.up) for m in mods]
    if method == "fisher":
        down, up = fisher_average_factors(parts, ws, fs)
        merged_fisher = sum(w * f.double() for w, f in zip(ws, fs))  # the combined precision Σ λ_i F_i
        down, up, row["fisher_error"], row["relative_error"] = fisher_to_rank(down, up, merged_fisher,
                                                                              min(rank, down.shape[0]))
        return down, up
    down, up = concat_factors(parts, ws)
    if method == "svd":
        down, up, row["relative_error"] = factor_to_rank(down, up, min(rank, down.shape[0]))  # no zero padding
    return down, up


def _dense_merge(name, mods, ws, fs, method, rank, base_weight, row):
    if method == "concat":
        m = next(m for m in mods if not m.FACTORED)
        raise UserError(f"merge --method concat: module {name} is a {m.TITLE}, whose update {m.UPDATE}, so no exact "
                        f"sum exists; use --method svd or fisher with --rank{' and --base' if m.NEEDS_BASE else ''}")
    needs_base = any(m.NEEDS_BASE for m in mods)
    if needs_base and base_weight is None:
        raise UserError(f"merge: module {name} is a DoRA; its update depends on the base weights: give --base")
    w0 = base_weight(name) if base_weight is not None else None  # also gives a flattened LyCORIS conv its shape
    deltas = [m.delta_weight(w0).double().flatten(1) for m in mods]
    shape = tuple(w0.shape) if w0 is not None else mods[0].weight_shape
    rank = min(rank, *deltas[0].shape)  # no zero padding past the full rank
    if method == "fisher":
        c = fisher_coefficients(ws, fs)
        total = sum(ci[:, None] * d for ci, d in zip(c, deltas))
        merged_fisher = sum(w * f.double() for w, f in zip(ws, fs))
        down, up, row["fisher_error"], row["relative_error"] = fisher_dense_to_rank(total, merged_fisher, rank)
    else:
        down, up, row["relative_error"] = dense_to_rank(sum(w * d for w, d in zip(ws, deltas)), rank)
    down = down.float().reshape(rank, *shape[1:])
    up = up.float().reshape(shape[0], rank, *([1] * (len(shape) - 2)))
    return down, up


def _family_of(adapter: AdapterWeights, path) -> str | None:
    """The adapter's family (its record's, its modules', its metadata's: adapter/family.py)."""
    from sdlora.adapter.family import adapter_family

    return adapter_family(adapter)[0].name


def run_merge(paths: list[str], out, *, weights: list[float] | None = None, method: str = "concat",
              rank: int | None = None, layout: str = "diffusers", dtype: str = "fp32", force: bool = False,
              base: str | None = None, fisher_data: list[str] | None = None, fisher_samples: int = DEFAULT_FISHER_SAMPLES,
              config_dir: str | None = None, report=print) -> tuple[AdapterWeights, list[dict]]:
    if len(paths) < 2:
        raise UserError("merge: give at least two adapter files")
    if method not in METHODS:
        raise UserError(f"merge --method {method!r}: allowed {', '.join(METHODS)}")
    if method in ("svd", "fisher") and rank is None:
        raise UserError(f"merge --method {method} needs --rank R")
    if method == "concat" and rank is not None:
        raise UserError("merge --rank applies to --method svd and fisher only (concat keeps every rank: the sum)")
    if rank is not None and rank < 1:
        raise UserError(f"merge --rank must be at least 1, got {rank}")
    if fisher_data and method != "fisher":
        raise UserError("merge --fisher-data applies to --method fisher only")
    weights = [1.0] * len(paths) if weights is None else [float(w) for w in weights]
    if len(weights) != len(paths):
        raise UserError(f"merge --weights: {len(weights)} weights for {len(paths)} adapters")
    if method == "fisher" and min(weights) <= 0:
        raise UserError(f"merge --method fisher: --weights are the Fisher average's λ_i and must be > 0, got "
                        f"{' '.join(f'{w:g}' for w in weights)}")
    out = check_output("merge", out, force=force, layout=layout, dtype=dtype)
    adapters = [load_adapter(p) for p in paths]
    versions = {v for a, p in zip(adapters, paths) if (v := _family_of(a, p))}
    if len(versions) > 1:
        raise UserError(f"merge: the adapters were trained on different model families ({', '.join(sorted(versions))})")
    fishers = None
    if method == "fisher":
        fishers = adapter_fishers("merge", adapters, paths, fisher_data=fisher_data, base=base,
                                  samples=fisher_samples, config_dir=config_dir, report=report)
    merged, rows = merge_adapters(adapters, weights, method, rank, fishers, base_weights(base, config_dir))
    merged.metadata = carried_metadata(adapters[0].metadata, "merge", {
        "sources": [Path(p).name for p in paths], "weights": weights, "method": method, "rank": rank})
    write_adapter(merged, out, layout, dtype, report=report, command="merge")
    columns = [("ranks in", "ranks_in"), ("rank", "rank")]
    if method != "concat":
        columns.append(("rel.error", "relative_error"))
    if method == "fisher":
        columns.append(("Fisher-weighted error", "fisher_error"))
    report(module_table(rows, columns))
    if method != "concat":
        worst = max(rows, key=lambda r: r["relative_error"])
        report(f"largest relative Frobenius error {worst['relative_error']:.3g} at {worst['name']}")
    if method == "fisher":
        worst = max(rows, key=lambda r: r["fisher_error"])
        report(f"largest Fisher-weighted relative error {worst['fisher_error']:.3g} at {worst['name']}")
    report(f"merge: {len(paths)} adapters ({method}) written to {out} ({layout} layout)")
    return merged, rows
