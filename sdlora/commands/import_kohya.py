"""`sdlora import-kohya CONFIG [--dataset-config DATASET] --out NEW.yaml`: a kohya-ss/sd-scripts config (or the
kohya_ss GUI's JSON) as an sdlora config, and a table of every option it holds (sdlora/kohya_import/).

The new config is validated by sdlora's own schema before it is written, written atomically, and never replaces
an existing file without --force. The table goes to standard output; so does a summary of what did not carry over.
"""

from __future__ import annotations

from pathlib import Path

from sdlora.commands.import_common import check_out, report_table as _table, summary, validate_and_write
from sdlora.kohya_import.rules import DEFAULT, Row


def report_table(rows: list[Row]) -> str:
    return _table(rows, "kohya option")


def run_import_kohya(config, out, *, dataset_config=None, force: bool = False, sdxl: bool = False, report=print) -> Path:
    """Convert, validate, write; returns the path written. Bad input is a one-line UserError (exit 2)."""
    from sdlora.kohya_import.convert import convert

    out = check_out(out, "import-kohya", force)
    data, rows, notes = convert(config, dataset_config, sdxl=sdxl)
    report(report_table(rows))
    for note in notes:
        report(f"note: {note}")
    header = (f"# Imported from {config}" + (f" and {dataset_config}" if dataset_config else "")
              + " by `sdlora import-kohya` (docs/kohya.md); the table it printed says what each kohya option became.\n")
    validate_and_write(data, out, "import-kohya", header)
    report(summary(out, rows, DEFAULT, "kohya defaults"))
    return out
