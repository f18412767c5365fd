"""What merge, resize and extract share: the output checks, the metadata a rewritten adapter carries, writing it
in a layout and dtype, the per-module report table, and where merge and resize get a row Fisher and base weights."""

from __future__ import annotations

import json
from pathlib import Path

from sdlora.adapter.fisher import METADATA_KEY as FISHER_KEY
from sdlora.adapter.fisher import RowFisher
from sdlora.adapter.io import LAYOUTS, reader_notes, save_adapter
from sdlora.adapter.weights import AdapterWeights
from sdlora.errors import UserError
from sdlora.util.dtypes import DTYPES
from sdlora.util.ownership import require_replaceable
from sdlora.util.tables import format_table

DTYPE_NAMES = tuple(DTYPES)


def check_output(command: str, out, *, force: bool, layout: str, dtype: str) -> Path:
    """The --out path, refused before any work when it exists (without --force) or the layout/dtype is unknown."""
    if layout not in LAYOUTS:
        raise UserError(f"{command} --layout {layout!r}: allowed {', '.join(LAYOUTS)}")
    if dtype not in DTYPE_NAMES:
        raise UserError(f"{command} --dtype {dtype!r}: allowed {', '.join(DTYPE_NAMES)}")
    out = Path(out).expanduser()
    if out.is_dir():
        raise UserError(f"{command}: --out {out} is a folder; give a .safetensors file")
    require_replaceable(out, command)  # --force or not: never a file sdlora did not write
    if out.exists() and not force:
        raise UserError(f"{command}: {out} exists; pass --force to replace it")
    return out


def carried_metadata(meta: dict[str, str], command: str, provenance: dict) -> dict[str, str]:
    """The input's metadata without its per-module table (the factors changed: save_native writes a new one), plus
    `sdlora.<command>`: what was done, as JSON. The run record stays: it names the base model and its family."""
    # the stored Fisher goes too: it was measured with the old update
    kept = {k: v for k, v in meta.items() if k not in ("sdlora.modules", FISHER_KEY) and not k.startswith("sshs_")}
    kept[f"sdlora.{command}"] = json.dumps(provenance, sort_keys=True)
    return kept


def write_adapter(adapter: AdapterWeights, out: Path, layout: str, dtype: str, *,
                  base_model_version: str | None = None, report=print, command: str = "sdlora") -> None:
    """Atomically, in `layout`; a 16-bit dtype balances each module's factors first (AdapterWeights.to). A file
    without a run record names its base model by `base_model_version` (else the input's ss_base_model_version).
    What other tools do not read exactly in it (`io.reader_notes`) is reported as a warning."""

    version = base_model_version or adapter.metadata.get("ss_base_model_version")
    save_adapter(adapter.to(DTYPES[dtype]), out, layout, base_model_version=version)
    for note in reader_notes(adapter, layout):
        report(f"{command}: warning: {note}")


def module_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """One line per module: (header, key) columns; floats with 4 significant digits."""
    def cell(v):
        return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))

    return format_table(["module"] + [h for h, _ in columns], [[r["name"]] + [cell(r[k]) for _, k in columns] for r in rows],
                        "l" + "r" * len(columns))


DEFAULT_FISHER_SAMPLES = 32


def adapter_fishers(command: str, adapters: list[AdapterWeights], paths: list, *, fisher_data: list[str] | None,
                    base: str | None, samples: int = DEFAULT_FISHER_SAMPLES, config_dir: str | None = None,
                    report=print) -> list[RowFisher]:
    """One row Fisher per adapter: estimated on `fisher_data` (one source per adapter, or one for all; needs `base`),
    else the one stored in the file (a UserError naming the file when it has none)."""
    if fisher_data:
        if len(fisher_data) not in (1, len(adapters)):
            raise UserError(f"{command} --fisher-data: {len(fisher_data)} sources for {len(adapters)} adapters "
                            "(give one for all, or one per adapter)")
        if base is None:
            raise UserError(f"{command} --fisher-data needs --base (the model the Fisher is measured with)")
        if samples < 1:
            raise UserError(f"{command} --fisher-samples must be at least 1, got {samples}")
        from sdlora.training.fisher import fisher_from_data

        sources = fisher_data * len(adapters) if len(fisher_data) == 1 else fisher_data
        out = []
        for i, (a, p, src) in enumerate(zip(adapters, paths, sources), 1):
            which = f" (adapter {i} of {len(adapters)})" if len(adapters) > 1 else ""  # inputs may share a file name
            report(f"{command}: estimating the row Fisher of {p}{which} on {src} ({samples} samples)")
            out.append(fisher_from_data(a, base, src, samples=samples, config_dir=config_dir))
    else:
        out = []
        for a, p in zip(adapters, paths):
            f = RowFisher.from_metadata(a.metadata, where=str(p))
            if f is None:
                raise UserError(f"{command}: {p} has no stored Fisher (train with export.fisher_samples, or give "
                                "--fisher-data FOLDER|PROMPTS and --base)")
            out.append(f)
    for f, a, p in zip(out, adapters, paths):
        f.check_covers(a, str(p))
    return out


def base_weights(base: str | None, config_dir: str | None = None):
    """name -> the base model's weight W0 of that module (loaded once, on first use); None without `base`."""
    if base is None:
        return None
    from sdlora.adapter.algebra import component_module

    loaded = {}

    def weight(name: str):
        if not loaded:
            from sdlora.model.loading import load_components

            if not Path(base).expanduser().exists():
                raise UserError(f"--base: no such file or folder: {base}")
            loaded["comps"] = load_components(str(base), config_dir=config_dir)
        return component_module(loaded["comps"].adaptable(), name, where=f"--base {base}").weight.detach()

    return weight
