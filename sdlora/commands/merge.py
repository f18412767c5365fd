"""`sdlora merge A B ... --out M [--weights w_A w_B ...] [--method concat|svd] [--rank R]`: several adapters as one.

concat: ΔW = Σ w_i ΔW_i exactly, as one adapter of rank Σ r_i (`algebra.concat_factors`).
svd: the same weighted sum re-factored to rank R (Eckart-Young, from the factors: `algebra.factor_to_rank`);
the relative Frobenius error of each module is reported. A module that only some adapters have is summed over
those that have it.
"""

from __future__ import annotations

from pathlib import Path

from sdlora.adapter.algebra import concat_factors, factor_to_rank
from sdlora.adapter.io import load_adapter
from sdlora.adapter.weights import AdapterWeights, ModuleDelta
from sdlora.commands.adapter_output import carried_metadata, check_output, module_table, write_adapter
from sdlora.errors import UserError

METHODS = ("concat", "svd")


def merge_adapters(adapters: list[AdapterWeights], weights: list[float], method: str = "concat",
                   rank: int | None = None) -> tuple[AdapterWeights, list[dict]]:
    """The merged adapter and one report row per module (name, ranks in and out, relative error of the svd)."""
    names = sorted({n for a in adapters for n in a.modules})
    modules, rows = {}, []
    for name in names:
        parts = [(a.modules[name].down, a.modules[name].up, w) for a, w in zip(adapters, weights) if name in a.modules]
        try:
            down, up = concat_factors([(d, u) for d, u, _ in parts], [w for _, _, w in parts])
        except ValueError as e:
            raise UserError(f"merge: module {name}: {e} (adapters for different base models?)") from None
        err = 0.0
        if method == "svd":
            down, up, err = factor_to_rank(down, up, min(rank, down.shape[0]))  # no zero padding past the sum
        modules[name] = ModuleDelta(down, up)
        rows.append({"name": name, "ranks_in": "+".join(str(d.shape[0]) for d, _, _ in parts), "rank": down.shape[0],
                     "relative_error": err})
    return AdapterWeights(modules), rows


def _family_of(adapter: AdapterWeights, path) -> str | None:
    from sdlora.adapter.run_record import RunRecord

    record = RunRecord.from_metadata(adapter.metadata)
    return record.base_model_version if record else adapter.metadata.get("ss_base_model_version")


def run_merge(paths: list[str], out, *, weights: list[float] | None = None, method: str = "concat",
              rank: int | None = None, layout: str = "diffusers", dtype: str = "fp32", force: bool = False,
              report=print) -> tuple[AdapterWeights, list[dict]]:
    if len(paths) < 2:
        raise UserError("merge: give at least two adapter files")
    if method not in METHODS:
        raise UserError(f"merge --method {method!r}: allowed {', '.join(METHODS)}")
    if method == "svd" and rank is None:
        raise UserError("merge --method svd needs --rank R")
    if method == "concat" and rank is not None:
        raise UserError("merge --rank applies to --method svd only (concat keeps every rank: the sum)")
    if rank is not None and rank < 1:
        raise UserError(f"merge --rank must be at least 1, got {rank}")
    weights = [1.0] * len(paths) if weights is None else [float(w) for w in weights]
    if len(weights) != len(paths):
        raise UserError(f"merge --weights: {len(weights)} weights for {len(paths)} adapters")
    out = check_output("merge", out, force=force, layout=layout, dtype=dtype)
    adapters = [load_adapter(p) for p in paths]
    for a in adapters:
        a.require_low_rank("merge")
    versions = {v for a, p in zip(adapters, paths) if (v := _family_of(a, p))}
    if len({v.removesuffix("_v") for v in versions}) > 1:
        raise UserError(f"merge: the adapters were trained on different model families ({', '.join(sorted(versions))})")
    merged, rows = merge_adapters(adapters, weights, method, rank)
    merged.metadata = carried_metadata(adapters[0].metadata, "merge", {
        "sources": [Path(p).name for p in paths], "weights": weights, "method": method, "rank": rank})
    write_adapter(merged, out, layout, dtype)
    columns = [("ranks in", "ranks_in"), ("rank", "rank")] + ([("rel.error", "relative_error")] if method == "svd" else [])
    report(module_table(rows, columns))
    if method == "svd":
        worst = max(rows, key=lambda r: r["relative_error"])
        report(f"largest relative Frobenius error {worst['relative_error']:.3g} at {worst['name']}")
    report(f"merge: {len(paths)} adapters ({method}) written to {out} ({layout} layout)")
    return merged, rows
