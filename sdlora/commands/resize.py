"""`sdlora resize ADAPTER --out NEW (--rank R | --sv-ratio X | --sv-fro X | --sv-cumulative X) [--max-rank R]`.

Each module is truncated to the rank its rule keeps (`algebra.rank_for`, kohya resize_lora.py's rules, so the
rank can differ per module), by the SVD of up @ down from the factors (`algebra.factor_to_rank`). The report gives
per module the rank kept and the share of ‖ΔW‖_F it keeps. A module whose rank is already within the rank asked
for keeps its factors bit for bit.
"""

from __future__ import annotations

from sdlora.adapter.algebra import RANK_RULES, factor_to_rank, factored_singular_values, rank_for, retained_fro
from sdlora.adapter.io import load_adapter
from sdlora.adapter.weights import AdapterWeights, ModuleDelta
from sdlora.commands.adapter_output import carried_metadata, check_output, module_table, write_adapter
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


def resize_adapter(adapter: AdapterWeights, rule: str, value: float,
                   max_rank: int | None = None) -> tuple[AdapterWeights, list[dict]]:
    """Every module at the rank its rule keeps; report rows: name, rank in and out, retained ‖ΔW‖_F share."""
    check_rule(rule, value, max_rank)
    modules, rows = {}, []
    for name, m in adapter.modules.items():
        s = factored_singular_values(m.down, m.up)
        k = rank_for(s, rule, value, max_rank)
        if k >= m.rank:  # nothing to cut: the factors as they are, exactly
            modules[name], k, kept = ModuleDelta(m.down, m.up), m.rank, 1.0
        else:
            down, up, _ = factor_to_rank(m.down, m.up, k)
            modules[name], kept = ModuleDelta(down, up), retained_fro(s, k)
        rows.append({"name": name, "rank_in": m.rank, "rank": k, "retained": kept})
    return AdapterWeights(modules), rows


def run_resize(path, out, rule: str, value: float, *, max_rank: int | None = None, layout: str = "diffusers",
               dtype: str = "fp32", force: bool = False, report=print) -> tuple[AdapterWeights, list[dict]]:
    check_rule(rule, value, max_rank)
    out = check_output("resize", out, force=force, layout=layout, dtype=dtype)
    adapter = load_adapter(path)
    adapter.require_low_rank("resize")
    resized, rows = resize_adapter(adapter, rule, value, max_rank)
    resized.metadata = carried_metadata(adapter.metadata, "resize", {"rule": rule, "value": value, "max_rank": max_rank})
    write_adapter(resized, out, layout, dtype)
    report(module_table(rows, [("rank in", "rank_in"), ("rank", "rank"), ("kept |dW|_F", "retained")]))
    if rows:
        worst = min(rows, key=lambda r: r["retained"])
        report(f"ranks {min(r['rank'] for r in rows)}..{max(r['rank'] for r in rows)}; least |dW|_F kept "
               f"{worst['retained']:.4f} at {worst['name']}")
    report(f"resize: written to {out} ({layout} layout)")
    return resized, rows
