"""What merge, resize and extract share: the output checks, the metadata a rewritten adapter carries, writing it
in a layout and dtype, and the per-module report table."""

from __future__ import annotations

import json
from pathlib import Path

from sdlora.adapter.io import LAYOUTS, save_adapter
from sdlora.adapter.weights import AdapterWeights
from sdlora.errors import UserError
from sdlora.util.tables import format_table

DTYPE_NAMES = ("fp32", "fp16", "bf16")


def check_output(command: str, out, *, force: bool, layout: str, dtype: str) -> Path:
    """The --out path, refused before any work when it exists (without --force) or the layout/dtype is unknown."""
    if layout not in LAYOUTS:
        raise UserError(f"{command} --layout {layout!r}: allowed {', '.join(LAYOUTS)}")
    if dtype not in DTYPE_NAMES:
        raise UserError(f"{command} --dtype {dtype!r}: allowed {', '.join(DTYPE_NAMES)}")
    out = Path(out).expanduser()
    if out.is_dir():
        raise UserError(f"{command}: --out {out} is a folder; give a .safetensors file")
    if out.exists() and not force:
        raise UserError(f"{command}: {out} exists; pass --force to replace it")
    return out


def carried_metadata(meta: dict[str, str], command: str, provenance: dict) -> dict[str, str]:
    """The input's metadata without its per-module table (the factors changed: save_native writes a new one), plus
    `sdlora.<command>`: what was done, as JSON. The run record stays: it names the base model and its family."""
    kept = {k: v for k, v in meta.items() if k != "sdlora.modules" and not k.startswith("sshs_")}
    kept[f"sdlora.{command}"] = json.dumps(provenance, sort_keys=True)
    return kept


def write_adapter(adapter: AdapterWeights, out: Path, layout: str, dtype: str, *,
                  base_model_version: str | None = None) -> None:
    """Atomically, in `layout`; a 16-bit dtype balances each module's factors first (AdapterWeights.to). A file
    without a run record names its base model by `base_model_version` (else the input's ss_base_model_version)."""
    from sdlora.training.export import DTYPES

    version = base_model_version or adapter.metadata.get("ss_base_model_version")
    save_adapter(adapter.to(DTYPES[dtype]), out, layout, base_model_version=version)


def module_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """One line per module: (header, key) columns; floats with 4 significant digits."""
    def cell(v):
        return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))

    return format_table(["module"] + [h for h, _ in columns], [[r["name"]] + [cell(r[k]) for _, k in columns] for r in rows],
                        "l" + "r" * len(columns))
