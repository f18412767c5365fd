"""`sdlora import-kohya CONFIG [--dataset-config DATASET] --out NEW.yaml`: a kohya-ss/sd-scripts config (or the
kohya_ss GUI's JSON) as an sdlora config, and a table of every option it holds (sdlora/kohya_import/).

The new config is validated by sdlora's own schema before it is written, written atomically, and never replaces
an existing file without --force. The table goes to standard output; so does a summary of what did not carry over.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from sdlora.errors import UserError
from sdlora.kohya_import.rules import DEFAULT, INVALID, UNKNOWN, UNSUPPORTED, Row
from sdlora.util.tables import format_table

MAX_VALUE_WIDTH = 40


def _shown(value) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= MAX_VALUE_WIDTH else text[:MAX_VALUE_WIDTH - 3] + "..."


def report_table(rows: list[Row]) -> str:
    return format_table(["kohya option", "value", "status", "sdlora key / why not"],
                        [[r.option, _shown(r.value), r.status, r.detail] for r in rows])


def run_import_kohya(config, out, *, dataset_config=None, force: bool = False, sdxl: bool = False, report=print) -> Path:
    """Convert, validate, write; returns the path written. Bad input is a one-line UserError (exit 2)."""
    from sdlora.config import validate
    from sdlora.kohya_import.convert import convert
    from sdlora.util import atomic

    out = Path(out)
    if out.suffix.lower() not in (".yaml", ".yml"):
        raise UserError(f"import-kohya --out {out}: the sdlora config is YAML (.yaml or .yml)")
    if out.exists() and not force:
        raise UserError(f"import-kohya --out {out} exists (use --force to replace it)")
    data, rows, notes = convert(config, dataset_config, sdxl=sdxl)
    report(report_table(rows))
    for note in notes:
        report(f"note: {note}")
    try:
        validate(yaml.safe_load(yaml.safe_dump(data)))  # exactly what the file will hold
    except UserError as e:
        raise UserError(f"import-kohya: the imported config does not validate ({e}); nothing written") from None
    header = (f"# Imported from {config}" + (f" and {dataset_config}" if dataset_config else "")
              + " by `sdlora import-kohya` (docs/kohya.md); the table it printed says what each kohya option became.\n")
    atomic.write_text(out, header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    gaps = [r for r in rows if r.status in (UNSUPPORTED, INVALID, UNKNOWN)]
    defaults = sum(r.status == DEFAULT for r in rows)
    report(f"wrote {out}: {len(rows)} options, {defaults} kohya defaults written explicitly, {len(gaps)} not carried "
           f"over" + (": " + ", ".join(r.option for r in gaps) if gaps else ""))
    return out
