"""`sdlora inspect`: what an adapter did to the model, per module and per block group.

Per module: rank, effective scale, ‖ΔW‖_F, ‖ΔW‖_F / ‖W0‖_F, effective rank of ΔW and the number of
intruder dimensions (the last two need the base model for W0; the maths is in `analysis.py`). With the
base model, also the text-embedding drift on the drift probe's prompts (`probe.py`), for every text output
of the family that the adapter changes (SDXL: each encoder's tokens and the pooled embedding). Reads both of
sdlora's layouts and kohya files from other trainers (`adapter.load_adapter`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from sdlora.adapter.algebra import as_matrix, component_module
from sdlora.adapter.io import file_layout, load_adapter
from sdlora.adapter.names import PARTS, split_name
from sdlora.adapter.weights import AdapterWeights
from sdlora.analysis import maths as analysis
from sdlora.errors import UserError
from sdlora.model.parts import DENOISER, TEXT_ENCODER
from sdlora.util.tables import format_table


# ------------------------------------------------------------------------------------------ base model
class BaseModel:
    """W0 of every adapted module, looked up by canonical name; W0's left singular basis cached per module."""

    def __init__(self, model_path: str):
        from sdlora.model.loading import load_components

        self.path = str(model_path)
        self.comps = load_components(model_path)
        self._bases: dict[str, analysis.LeftSingularBasis] = {}

    def module(self, name: str) -> torch.nn.Module:
        return component_module(self.comps.adaptable(), name,
                                where=f"the base model {self.path} ({self.comps.family.title})")

    def weight(self, name: str, delta_shape: torch.Size) -> torch.Tensor:
        w = self.module(name).weight.detach()
        if w.numel() != math.prod(delta_shape):
            raise UserError(f"adapter module {name}: update of shape {tuple(delta_shape)} does not fit the base weight "
                            f"{tuple(w.shape)} in {self.path} (a different base model?)")
        return w

    def basis(self, name: str, w0: torch.Tensor) -> analysis.LeftSingularBasis:
        if name not in self._bases:
            self._bases[name] = analysis.LeftSingularBasis(w0)
        return self._bases[name]


# ---------------------------------------------------------------------------------------------- groups
# Within a part, by its role (model/parts.py): (pattern over the module path, the group's words after the part name).
_GROUPS = {
    TEXT_ENCODER: [(re.compile(r"^encoder\.layers\.(\d+)\."), lambda m: f".layers.{m.group(1)}")],
    DENOISER: [(re.compile(r"^down_blocks\.(\d+)\."), lambda m: f".down.{m.group(1)}"),
               (re.compile(r"^conv_in\b"), lambda m: ".down"),
               (re.compile(r"^mid_block\."), lambda m: ".mid"),
               (re.compile(r"^up_blocks\.(\d+)\."), lambda m: f".up.{m.group(1)}"),
               (re.compile(r"^conv_out\b"), lambda m: ".up"),
               # an MMDiT (SD3): its joint blocks, as optim.lr_rules names them (transformer.joint_blocks.N)
               (re.compile(r"^transformer_blocks\.(\d+)\."), lambda m: f".joint_blocks.{m.group(1)}")],
}


def group_of(name: str) -> str:
    """The block group a module belongs to, in `optim.lr_rules`' naming (text_encoder.layers.N, unet.down.N, ...):
    its part, and within a text encoder its layer, within a UNet its block, within an MMDiT its joint block."""
    component, path = split_name(name)
    for pattern, label in _GROUPS.get(PARTS[component].role, ()):
        m = pattern.match(path)
        if m:
            return component + label(m)
    return component


# ---------------------------------------------------------------------------------------------- report
def module_entry(name: str, m, base: BaseModel | None, top_k: int, epsilon: float) -> dict:
    w0 = base.weight(name, m.weight_shape) if base is not None else None
    if m.NEEDS_BASE and w0 is None:  # e.g. DoRA: ΔW is dense and depends on W0
        raise UserError(f"inspect: module {name} is {m.kind}, whose update depends on the base weight; give --base")
    delta, s = m.spectrum(w0)  # ΔW as an (out, in·kh·kw) float64 matrix and its singular values (factored for LoRA)
    dw_norm = float(torch.linalg.vector_norm(delta))
    shape = tuple(w0.shape) if w0 is not None else m.weight_shape  # a LyCORIS conv from another trainer is flattened
    entry = {"name": name, "group": group_of(name), "kind": "conv" if len(shape) == 4 else "linear", "rank": m.rank,
             "trained_rank": m.trained_rank, "alpha": m.alpha, "scale": m.scale, "shape": list(shape),
             "dw_norm": dw_norm, "effective_rank": analysis.effective_rank(s),
             "w0_norm": None, "relative_norm": None, "intruders": None, "intruder_singular_values": None}
    if base is not None:
        w0 = as_matrix(w0)  # float64 once: the norm, the basis and W0 + ΔW below take it without copies
        w0_norm = analysis.frobenius(w0)
        result = analysis.find_intruders(w0, delta, top_k=top_k, epsilon=epsilon, base=base.basis(name, w0))
        entry.update(w0_norm=w0_norm, relative_norm=dw_norm / w0_norm if w0_norm > 0 else None,
                     intruders=result.count,
                     intruder_singular_values=[float(result.singular_values[i]) for i in result.indices])
    return entry


def group_summaries(entries: list[dict]) -> list[dict]:
    """Per group (and `all`): module count, ‖ΔW‖_F of the group (root of the sum of squares), mean relative norm,
    mean effective rank and the total number of intruders."""
    order: dict[str, list[dict]] = {}
    for e in entries:
        order.setdefault(e["group"], []).append(e)
    rows = [_summarise(g, es) for g, es in order.items()]
    return rows + [_summarise("all", entries)] if entries else rows


def _summarise(group: str, es: list[dict]) -> dict:
    rel = [e["relative_norm"] for e in es if e["relative_norm"] is not None]
    intr = [e["intruders"] for e in es if e["intruders"] is not None]
    return {"group": group, "modules": len(es), "dw_norm": math.sqrt(sum(e["dw_norm"] ** 2 for e in es)),
            "mean_relative_norm": sum(rel) / len(rel) if rel else None,
            "mean_effective_rank": sum(e["effective_rank"] for e in es) / len(es),
            "intruders": sum(intr) if intr else None}


def clip_skip_of(adapter: AdapterWeights) -> int:
    """The clip skip the adapter was trained with: its run record, else kohya's ss_clip_skip (other trainers), else 1."""
    from sdlora.adapter.run_record import RunRecord

    record = RunRecord.from_metadata(adapter.metadata)
    if record is not None:
        return record.clip_skip
    value = adapter.metadata.get("ss_clip_skip", "")
    return int(value) if value.isdigit() and int(value) >= 1 else 1


@torch.no_grad()
def text_encoder_drift(adapter: AdapterWeights, base: BaseModel) -> dict | None:
    """The drift probe's statistics with the adapter's text-encoder updates merged into W0 (restored after), for each
    text output of the family whose encoder the adapter changes: `outputs[<output>]` = {drift, cosine, norm,
    base_norm}; the first of them (SD 1.x/2.x's only one) also at the top level."""
    from sdlora.reg.probe import DriftProbes, family_probe

    comps = base.comps
    names = [n for n in adapter.modules if split_name(n)[0] in comps.family.text_encoders]
    if not names:
        return None
    touched = {split_name(n)[0] for n in names}
    encoders = {c: te for c, te in comps.text_encoders.items() if c in touched}
    probe = family_probe(comps.family, encoders, dict(zip(comps.text_encoders, comps.tokenizers)), None,
                         clip_skip_of(adapter))
    probes = probe.probes if isinstance(probe, DriftProbes) else [probe]
    probe.measure()  # the first measurement caches E0 from the untouched encoders
    saved = {}
    try:
        for n in names:
            w = base.module(n).weight
            saved[n] = w.detach().clone()
            w.add_(adapter.modules[n].delta_weight(w).reshape(w.shape).to(w.dtype))
        stats = probe.measure()
    finally:
        for n, w0 in saved.items():
            base.module(n).weight.copy_(w0)
    outputs = {}
    for p in probes:  # `probe/<value>` for the family's first output, `probe/<output>/<value>` for the others
        output = p.prefix.removeprefix("probe/").rstrip("/") or comps.family.text_outputs[0][0]
        outputs[output] = {k.removeprefix(p.prefix): v for k, v in stats.items()
                           if k.startswith(p.prefix) and "/" not in k.removeprefix(p.prefix)}
    first = next(iter(outputs.values()))
    return {**first, "outputs": outputs, "prompts": len(probes[0].prompts), "clip_skip": probes[0].clip_skip}


def inspect_adapter(path: str | Path, base: BaseModel | None = None, *, top_k: int = 10, epsilon: float = 0.5) -> dict:
    """The whole report for one adapter file, as plain JSON-able data."""
    if top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    if not 0 < epsilon <= 1:
        raise UserError(f"--epsilon must be in (0, 1], got {epsilon}")
    adapter = load_adapter(path).to(torch.float32)
    entries = [module_entry(n, m, base, top_k, epsilon) for n, m in adapter.modules.items()]
    return {"adapter": str(path), "layout": file_layout(path), "base": base.path if base else None,
            "top_k": top_k, "epsilon": epsilon, "modules": entries, "groups": group_summaries(entries),
            "text_encoder_drift": text_encoder_drift(adapter, base) if base else None}


# -------------------------------------------------------------------------------------------- display
def _f(x, fmt: str = ".4g") -> str:
    return "-" if x is None else format(x, fmt)


_COLUMNS = [  # header, how to read it from a module entry
    ("rank", lambda e: str(e["rank"])),
    ("scale", lambda e: _f(e["scale"])),
    ("alpha", lambda e: _f(e["alpha"])),
    ("|dW|", lambda e: _f(e["dw_norm"])),
    ("|dW|/|W0|", lambda e: _f(e["relative_norm"])),
    ("eff.rank", lambda e: _f(e["effective_rank"], ".3g")),
    ("intruders", lambda e: "-" if e["intruders"] is None else str(e["intruders"])),
]


def format_report(report: dict, compare: dict | None = None) -> str:
    if compare is None:
        head = f"adapter {report['adapter']} ({report['layout']} layout, {len(report['modules'])} modules)"
        rows = [[e["name"]] + [read(e) for _, read in _COLUMNS] for e in report["modules"]]
        table = format_table(["module"] + [h for h, _ in _COLUMNS], rows, "l" + "r" * len(_COLUMNS))
        groups = _groups_table(report)
    else:
        head = f"A = {report['adapter']} ({report['layout']}), B = {compare['adapter']} ({compare['layout']})"
        a = {e["name"]: e for e in report["modules"]}
        b = {e["name"]: e for e in compare["modules"]}
        names = list(a) + [n for n in b if n not in a]
        rows = [[n] + [x for _, read in _COLUMNS for x in (read(a[n]) if n in a else "-", read(b[n]) if n in b else "-")]
                for n in names]
        headers = ["module"] + [f"{h} {side}" for h, _ in _COLUMNS for side in "AB"]
        table = format_table(headers, rows, "l" + "r" * (len(headers) - 1))
        groups = "A:\n" + _groups_table(report) + "\n\nB:\n" + _groups_table(compare)
    lines = [head]
    if report["base"]:
        lines.append(f"base model {report['base']}; intruders: top {report['top_k']} singular vectors of W0+dW whose "
                     f"largest |cos| with W0's singular vectors is < {report['epsilon']}")
    else:
        lines.append("no --base: |dW|/|W0|, intruders and the text-embedding drift need the base model")
    lines += ["", table, "", "per block group:", groups]
    for r in [report] + ([compare] if compare else []):
        d = r["text_encoder_drift"]
        if d is not None:
            outputs = d.get("outputs") or {"text_encoder": d}
            for output, o in outputs.items():
                which = "" if len(outputs) == 1 else f" ({output}{' embedding' if output == 'pooled' else ''})"
                lines.append(f"\ntext-embedding drift{which} of {r['adapter']} on {d['prompts']} probe prompts: relative "
                             f"norm drift {o['drift']:.4g}, cosine {o['cosine']:.6f} (mean token norm {o['norm']:.4g} "
                             f"vs base {o['base_norm']:.4g})")
        elif r["base"]:
            lines.append(f"\n{r['adapter']}: no text-encoder modules, no text-embedding drift")
    return "\n".join(lines)


def _groups_table(report: dict) -> str:
    rows = [[g["group"], g["modules"], _f(g["dw_norm"]), _f(g["mean_relative_norm"]), _f(g["mean_effective_rank"], ".3g"),
             "-" if g["intruders"] is None else g["intruders"]] for g in report["groups"]]
    return format_table(["group", "modules", "|dW|", "mean |dW|/|W0|", "mean eff.rank", "intruders"], rows, "lrrrrr")


def write_plots(reports: list[dict], out_dir: str | Path) -> list[Path]:
    """dw_norm.png (‖ΔW‖_F per module) and, with a base model, intruders.png; one bar series per adapter."""
    from sdlora.analysis.plots import bar_chart

    out_dir = Path(out_dir)
    names = list(dict.fromkeys(e["name"] for r in reports for e in r["modules"]))
    labels = [Path(r["adapter"]).name for r in reports]
    if len(set(labels)) < len(labels):  # run_a/adapter.safetensors vs run_b/adapter.safetensors
        labels = ["/".join(Path(r["adapter"]).parts[-2:]) for r in reports]

    def series(key):
        return [[{e["name"]: e[key] for e in r["modules"]}.get(n) for n in names] for r in reports]

    written = [bar_chart(out_dir / "dw_norm.png", names, series("dw_norm"), labels, "||dW||_F per module")]
    if reports[0]["base"]:
        written.append(bar_chart(out_dir / "intruders.png", names, series("intruders"), labels,
                                 f"intruder dimensions per module (top {reports[0]['top_k']}, eps {reports[0]['epsilon']})"))
    return written
