"""`sdlora import-onetrainer CONFIG.json [--concepts CONCEPTS.json] [--samples SAMPLES.json] --out NEW.yaml`:
OneTrainer's saved training config as an sdlora config, and a table of every option it holds
(sdlora/onetrainer_import/).

The table goes to standard output first, so a refusal (a model type or training method sdlora does not train, the
concepts in a file not given) still shows every row; then the refusal is one line and nothing is written. The new
config is validated by sdlora's own schema, written atomically, and never replaces a file without --force.
"""

from __future__ import annotations

from pathlib import Path

from sdlora.commands.import_common import check_out, report_table, summary, validate_and_write
from sdlora.errors import UserError


def run_import_onetrainer(config, out, *, concepts=None, samples=None, force: bool = False, report=print) -> Path:
    """Convert, validate, write; returns the path written. Bad input is a one-line UserError (exit 2)."""
    from sdlora.onetrainer_import.convert import DEFAULT, convert

    out = check_out(out, "import-onetrainer", force)
    data, rows, notes, refused = convert(config, concepts, samples)
    report(report_table(rows, "OneTrainer option"))
    for note in notes:
        report(f"note: {note}")
    if refused:
        raise UserError(f"import-onetrainer {config}: " + "; ".join(refused) + "; nothing written")
    named = [f for f in (concepts, samples) if f]
    header = (f"# Imported from {config}" + "".join(f" and {f}" for f in named) + " by `sdlora import-onetrainer` "
              "(docs/onetrainer.md); the table it printed says what each OneTrainer option became.\n")
    validate_and_write(data, out, "import-onetrainer", header)
    report(summary(out, rows, DEFAULT, "OneTrainer defaults"))
    return out
