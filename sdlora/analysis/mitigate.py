"""`sdlora inspect --mitigate-intruders LAMBDA`: write a copy of an adapter with its intruder directions scaled.

Per module (maths in `analysis.mitigate_intruders`): W' = W − (1 − λ) Σ_intruders σ_i u_i v_iᵀ, ΔW' = W' − W0,
refactored to the module's rank by truncated SVD. The new file has the input's layout (native or kohya),
its metadata plus a `sdlora.mitigate_intruders` record, and is written atomically.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from sdlora.adapter.io import file_layout, load_adapter, save_adapter
from sdlora.adapter.weights import AdapterWeights
from sdlora.analysis import maths as analysis
from sdlora.analysis.inspect import BaseModel
from sdlora.errors import UserError
from sdlora.util.ownership import require_replaceable
from sdlora.util.tables import format_table


def mitigate_adapter(path: str | Path, base: BaseModel, lam: float, out: str | Path, *, top_k: int = 10,
                     epsilon: float = 0.5, overwrite: bool = False) -> dict:
    """Write the mitigated adapter to `out`; return what changed per module (JSON-able)."""
    path, out = Path(path), Path(out)
    if not lam >= 0:
        raise UserError(f"--mitigate-intruders: LAMBDA must be >= 0 (1 = unchanged, 0 = intruders removed), got {lam}")
    if out.exists() and out.resolve() == path.resolve():
        raise UserError(f"--out {out} is the input adapter; choose a new file name")
    require_replaceable(out, "inspect --mitigate-intruders")  # never a file sdlora did not write
    if out.exists() and not overwrite:
        raise UserError(f"--out {out} exists; choose a new file name or pass --overwrite")
    adapter = load_adapter(path)
    adapter.require_low_rank("--mitigate-intruders")
    layout = file_layout(path)
    modules, changes = {}, []
    for name, m in adapter.modules.items():
        w0 = base.weight(name, m.weight_shape)
        r = analysis.mitigate_intruders(w0, m.down, m.up, lam, top_k=top_k, epsilon=epsilon,
                                        base=base.basis(name, w0))
        modules[name] = replace(m, down=r.down, up=r.up)
        changes.append({"name": name, "intruders_before": r.intruders_before, "intruders_after": r.intruders_after,
                        "singular_values_before": r.singular_values_before,
                        "singular_values_after": r.singular_values_after, "truncation_error": r.truncation_error})
    meta = dict(adapter.metadata)
    meta["sdlora.mitigate_intruders"] = json.dumps({"lambda": lam, "top_k": top_k, "epsilon": epsilon,
                                                    "source": path.name, "base": base.path})
    save_adapter(AdapterWeights(modules, meta), out, layout, keep_metadata=True)
    return {"adapter": str(path), "out": str(out), "layout": layout, "lambda": lam, "top_k": top_k,
            "epsilon": epsilon, "modules": changes}


def format_mitigation(report: dict) -> str:
    def svs(xs):
        return ", ".join(f"{x:.4g}" for x in xs) or "-"

    rows = [[c["name"], c["intruders_before"], c["intruders_after"], svs(c["singular_values_before"]),
             svs(c["singular_values_after"]), f"{c['truncation_error']:.2e}"] for c in report["modules"]]
    table = format_table(["module", "intruders before", "after", "intruder sigma before", "after", "trunc. error"],
                         rows, "lrrllr")
    changed = sum(1 for c in report["modules"] if c["intruders_before"])
    return (f"{table}\n\n{changed} of {len(report['modules'])} modules had intruders; their directions were scaled by "
            f"{report['lambda']:g}.\nwrote {report['out']} ({report['layout']} layout)")

