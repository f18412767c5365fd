"""`sdlora extract --base BASE --tuned TUNED --rank R --out L [--conv] [--conv-rank R]`: a LoRA from two checkpoints.

For every adaptable module of every adaptable part of the family (`Part.extract_linears`, model/parts.py: the
UNet's attention Linears and 1x1 projections, each text encoder's layer Linears, every Linear of an MMDiT's joint
blocks; with --conv the UNet's 3x3 convolutions that sdlora's conv LoRA adapts, refused on a family without them),
ΔW = W_tuned - W_base in float64 and its best rank-R factors (`algebra.dense_to_rank`, a randomised SVD where R is
small). A module whose weights are equal, or whose ‖ΔW‖_F is below --min-diff · ‖W_base‖_F, is left out. The
report gives per module the relative Frobenius error ‖ΔW - up·down‖_F / ‖ΔW‖_F. Either model may be a diffusers
folder or a single file.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from sdlora.adapter.algebra import dense_to_rank
from sdlora.adapter.names import canonical_name
from sdlora.adapter.weights import AdapterWeights, ModuleDelta
from sdlora.commands.adapter_output import check_output, module_table, write_adapter
from sdlora.config import DEFAULT_CONV_TARGETS
from sdlora.errors import UserError
from sdlora.model.parts import Part


def _is_conv_target(path: str) -> bool:
    return any(path == t or path.endswith("." + t) for t in DEFAULT_CONV_TARGETS)


def extractable(part: Part, model: nn.Module, conv: bool) -> dict[str, nn.Module]:
    """Module path -> module of what extract considers in `part` (model/parts.py): the Linears its `extract_linears`
    names, and in a part with conv LoRA (the UNet) its 1x1 `proj_in` / `proj_out` and, with `conv`, the 3x3
    convolutions sdlora's conv LoRA adapts (not conv_in, conv_out or the time embedding, whose kohya keys diffusers
    cannot load)."""
    linears = re.compile(part.extract_linears) if part.extract_linears else None
    found = {}
    for path, m in model.named_modules():
        if isinstance(m, nn.Linear):
            keep = linears is not None and bool(linears.search(f".{path}"))
        elif isinstance(m, nn.Conv2d) and part.conv_lora:
            one_by_one = m.kernel_size == (1, 1) and path.rsplit(".", 1)[-1] in ("proj_in", "proj_out")
            keep = one_by_one or (conv and _is_conv_target(path) and m.groups == 1)
        else:
            keep = False
        if keep:
            found[path] = m
    return found


@torch.no_grad()
def extract_adapter(base, tuned, rank: int, *, conv: bool = False, conv_rank: int | None = None,
                    min_diff: float = 0.0) -> tuple[AdapterWeights, list[dict]]:
    """`base` and `tuned` are loaded Components of one family; returns the adapter and one report row per extracted
    module, over every adaptable part of the family (its denoiser and each text encoder)."""
    modules, rows = {}, []
    tuned_models = tuned.adaptable()
    for component, base_model in base.adaptable().items():
        tuned_model = tuned_models[component]
        for path, module in extractable(base.family.part(component), base_model, conv).items():
            name = canonical_name(component, path)
            try:
                other = tuned_model.get_submodule(path)
            except AttributeError:
                raise UserError(f"extract: the tuned model has no module {name} (a different architecture?)") from None
            w0, w1 = module.weight.detach(), other.weight.detach()
            if w0.shape != w1.shape:
                raise UserError(f"extract: {name} is {tuple(w0.shape)} in the base and {tuple(w1.shape)} in the tuned model")
            if torch.equal(w0, w1):
                continue
            delta = w1.double().flatten(1) - w0.double().flatten(1)
            norm, base_norm = float(torch.linalg.vector_norm(delta)), float(torch.linalg.vector_norm(w0.double()))
            if norm <= min_diff * base_norm:
                continue
            r = conv_rank if (conv_rank and w0.dim() == 4 and w0.shape[-1] > 1) else rank
            down, up, err = dense_to_rank(delta, r)
            if w0.dim() == 4:
                down, up = down.reshape(r, *w0.shape[1:]), up.reshape(up.shape[0], r, 1, 1)
            modules[name] = ModuleDelta(down.float(), up.float())
            rows.append({"name": name, "rank": r, "dw_norm": norm, "relative_norm": norm / base_norm if base_norm else None,
                         "relative_error": err})
    return AdapterWeights(modules), rows


def run_extract(base_path, tuned_path, out, rank: int, *, conv: bool = False, conv_rank: int | None = None,
                min_diff: float = 0.0, config_dir: str | None = None, layout: str = "diffusers", dtype: str = "fp32",
                force: bool = False, report=print) -> tuple[AdapterWeights, list[dict]]:
    import json

    from sdlora.model.loading import load_components

    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise UserError(f"extract --rank and --conv-rank must be at least 1, got {rank if rank < 1 else conv_rank}")
    if min_diff < 0:
        raise UserError(f"extract --min-diff must be >= 0, got {min_diff:g}")
    out = check_output("extract", out, force=force, layout=layout, dtype=dtype)
    for flag, p in (("--base", base_path), ("--tuned", tuned_path)):
        if not Path(p).expanduser().exists():
            raise UserError(f"extract {flag}: no such file or folder: {p}")
    base = load_components(str(base_path), config_dir=config_dir)
    tuned = load_components(str(tuned_path), config_dir=config_dir)
    if base.base_model_version.removesuffix("_v") != tuned.base_model_version.removesuffix("_v"):
        raise UserError(f"extract: --base is {base.base_model_version} and --tuned {tuned.base_model_version}")
    denoiser = base.family.denoiser
    if (conv or conv_rank is not None) and not denoiser.conv_lora:
        raise UserError(f"extract --conv / --conv-rank: {base.family.title}'s {denoiser.name} has no convolutions "
                        "LoRA adapts (its LoRA modules are Linear layers)")
    adapter, rows = extract_adapter(base, tuned, rank, conv=conv, conv_rank=conv_rank, min_diff=min_diff)
    if not rows:
        raise UserError("extract: no adaptable module differs between --base and --tuned; nothing written")
    adapter.metadata = {"sdlora.extract": json.dumps({"base": str(base_path), "tuned": str(tuned_path), "rank": rank,
                                                      "conv": conv, "conv_rank": conv_rank, "min_diff": min_diff}),
                        "ss_base_model_version": tuned.base_model_version}
    write_adapter(adapter, out, layout, dtype, base_model_version=tuned.base_model_version)
    report(module_table(rows, [("rank", "rank"), ("|dW|", "dw_norm"), ("|dW|/|W0|", "relative_norm"),
                               ("rel.error", "relative_error")]))
    worst = max(rows, key=lambda r: r["relative_error"])
    report(f"{len(rows)} modules; largest relative Frobenius error {worst['relative_error']:.3g} at {worst['name']}")
    report(f"extract: written to {out} ({layout} layout)")
    return adapter, rows
