"""`sdlora resize ADAPTER --out NEW (--rank R | --sv-ratio X | --sv-fro X | --sv-cumulative X) [--max-rank R]`.

Each module is truncated to the rank its rule keeps (`algebra.rank_for`, kohya resize_lora.py's rules, so the
rank can differ per module), by the SVD of up @ down from the factors (`algebra.factor_to_rank`). The report gives
per module the rank kept and the share of ‖ΔW‖_F it keeps. A module whose rank is already within the rank asked
for keeps its factors bit for bit.

--fisher: FWSVD (Hsu et al., ICLR 2022): the rule reads the singular values of diag(sqrt(F))·up @ down, F the
adapter's row Fisher (stored, or estimated with --fisher-data and --base), and the module keeps the rank-k update
minimising the Fisher-weighted error (`algebra.fisher_to_rank`); the report gives the share of the weighted
‖diag(sqrt(F)) ΔW‖_F kept, and the plain share.

DoRA modules keep their magnitude vector; their low-rank direction update up @ down is truncated as a LoRA's is
(at full rank nothing changes; below it the DoRA update moves with V = W0 + (up @ down)_k, and the shares reported
are those of up @ down, not of the DoRA update).

LoHa and LoKr modules are refused (a UserError naming the module): they have no up @ down to cut, and cutting
their dense update would change the file's kind; `merge --method svd` (of the file with itself at weights 0.5 0.5)
re-factors them as a LoRA.
"""

from __future__ import annotations

from dataclasses import replace

from sdlora.adapter.algebra import (RANK_RULES, factor_to_rank, factored_singular_values, fisher_singular_values,
                                    fisher_to_rank, rank_for, retained_fro)
from sdlora.adapter.io import load_adapter
from sdlora.adapter.weights import AdapterWeights, ModuleDelta
from sdlora.commands.adapter_output import (DEFAULT_FISHER_SAMPLES, adapter_fishers, carried_metadata, check_output,
                                           module_table, write_adapter)
from sdlora.errors import UserError


def check_rule(rule: str, value: float, max_rank: int | None) -> None:
    if rule not in RANK_RULES:
        raise UserError(f"resize: rule {rule!r}: allowed {', '.join(RANK_RULES)}")
    flag = "--" + rule.replace("_", "-")
    if rule == "rank" and (value < 1 or value != int(value)):
        raise UserError(f"resize --rank must be a whole number >= 1, got {value:g}")
    if rule == "sv_ratio" and value < 1:
        raise UserError(f"resize --sv-ratio is σ_max / σ_min kept, at least 1; got {value:g}")
    if rule in ("sv_fro", "sv_cumulative") and not 0 < value <= 1:
        raise UserError(f"resize {flag} is a share in (0, 1], got {value:g}")
    if max_rank is not None and max_rank < 1:
        raise UserError(f"resize --max-rank must be at least 1, got {max_rank}")


def resize_adapter(adapter: AdapterWeights, rule: str, value: float, max_rank: int | None = None,
                   fisher=None) -> tuple[AdapterWeights, list[dict]]:
    """Every module at the rank its rule keeps; report rows: name, rank in and out, retained ‖ΔW‖_F share, and with
    a `RowFisher` the retained share of the Fisher-weighted update (the rule then reads its singular values)."""
    check_rule(rule, value, max_rank)
    modules, rows = {}, []
    for name, m in adapter.modules.items():
        if not isinstance(m, ModuleDelta):  # LoRA and DoRA (a ModuleDelta) carry the factors up @ down
            raise UserError(f"resize: module {name} is a {m.TITLE}, whose update {m.UPDATE}: there are no factors to "
                            "cut (resize takes LoRA and DoRA; merge --method svd re-factors it as a LoRA)")
        f = fisher.modules[name] if fisher is not None else None
        s = factored_singular_values(m.down, m.up)
        sw = fisher_singular_values(m.down, m.up, f) if f is not None else None
        k = rank_for(s if sw is None else sw, rule, value, max_rank)
        kept_w = None
        if k >= m.rank:  # nothing to cut: the factors as they are, exactly
            modules[name], k, kept = _with_factors(m, m.down, m.up), m.rank, 1.0
            kept_w = 1.0 if f is not None else None
        elif f is None:
            down, up, _ = factor_to_rank(m.down, m.up, k)
            modules[name], kept = _with_factors(m, down, up), retained_fro(s, k)
        else:
            down, up, _, err = fisher_to_rank(m.down, m.up, f, k)
            modules[name], kept, kept_w = _with_factors(m, down, up), (1 - err**2) ** 0.5, retained_fro(sw, k)
        rows.append({"name": name, "rank_in": m.rank, "rank": k, "retained": kept, "retained_fisher": kept_w})
    return AdapterWeights(modules), rows


def _with_factors(m, down, up):
    """The module's record (its kind and extra tensors, e.g. a DoRA magnitude) with new factors; the report fields
    (scale, alpha, trained rank) no longer describe them."""
    return replace(m, down=down, up=up, scale=1.0, alpha=None, trained_rank=None)


def run_resize(path, out, rule: str, value: float, *, max_rank: int | None = None, layout: str = "diffusers",
               dtype: str = "fp32", force: bool = False, fisher: bool = False, fisher_data: str | None = None,
               base: str | None = None, fisher_samples: int = DEFAULT_FISHER_SAMPLES, config_dir: str | None = None,
               report=print) -> tuple[AdapterWeights, list[dict]]:
    check_rule(rule, value, max_rank)
    if fisher_data and not fisher:
        raise UserError("resize --fisher-data applies with --fisher only")
    out = check_output("resize", out, force=force, layout=layout, dtype=dtype)
    adapter = load_adapter(path)
    row_fisher = None
    if fisher:
        row_fisher = adapter_fishers("resize", [adapter], [path], fisher_data=[fisher_data] if fisher_data else None,
                                     base=base, samples=fisher_samples, config_dir=config_dir, report=report)[0]
    resized, rows = resize_adapter(adapter, rule, value, max_rank, row_fisher)
    resized.metadata = carried_metadata(adapter.metadata, "resize", {"rule": rule, "value": value, "max_rank": max_rank,
                                                                     "fisher": fisher})
    write_adapter(resized, out, layout, dtype, report=report, command="resize")
    columns = [("rank in", "rank_in"), ("rank", "rank"), ("kept |dW|_F", "retained")]
    if fisher:
        columns.append(("kept Fisher-weighted", "retained_fisher"))
    report(module_table(rows, columns))
    if rows:
        key = "retained_fisher" if fisher else "retained"
        worst = min(rows, key=lambda r: r[key])
        report(f"ranks {min(r['rank'] for r in rows)}..{max(r['rank'] for r in rows)}; least "
               f"{'Fisher-weighted ' if fisher else ''}|dW|_F kept {worst[key]:.4f} at {worst['name']}")
    report(f"resize: written to {out} ({layout} layout)")
    return resized, rows
