"""What every config importer shares once its table has run: the printed table, the check of the new config by
sdlora's own schema, and the atomic write (`sdlora import-kohya`, `sdlora import-onetrainer`).

The rows are sdlora.kohya_import.rules.Row; each importer passes the name of its first column and its own
"default written explicitly" status.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from sdlora.errors import UserError
from sdlora.kohya_import.rules import INVALID, UNKNOWN, UNSUPPORTED, Row
from sdlora.util.tables import format_table

MAX_VALUE_WIDTH = 40
GAPS = (UNSUPPORTED, INVALID, UNKNOWN)  # the statuses the summary line names: what did not carry over


def _shown(value) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= MAX_VALUE_WIDTH else text[:MAX_VALUE_WIDTH - 3] + "..."


def report_table(rows: list[Row], first_column: str) -> str:
    """The table: one line per row, option / value (cut to 40 characters) / status / sdlora key or why not."""
    return format_table([first_column, "value", "status", "sdlora key / why not"],
                        [[r.option, _shown(r.value), r.status, r.detail] for r in rows])


def check_out(out, command: str, force: bool) -> Path:
    """--out as a Path; UserError when it is not .yaml/.yml or exists without --force."""
    out = Path(out)
    if out.suffix.lower() not in (".yaml", ".yml"):
        raise UserError(f"{command} --out {out}: the sdlora config is YAML (.yaml or .yml)")
    if out.exists() and not force:
        raise UserError(f"{command} --out {out} exists (use --force to replace it)")
    return out


def validate_and_write(data: dict, out: Path, command: str, header: str) -> None:
    """Validate exactly what the file will hold (UserError, nothing written, when it does not), then write it
    atomically with `header` (comment lines) above the YAML."""
    from sdlora.config import validate
    from sdlora.util import atomic

    try:
        validate(yaml.safe_load(yaml.safe_dump(data)))
    except UserError as e:
        raise UserError(f"{command}: the imported config does not validate ({e}); nothing written") from None
    atomic.write_text(out, header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def summary(out: Path, rows: list[Row], default_status: str, defaults_said: str) -> str:
    """`wrote OUT: N options, D <defaults_said> written explicitly, G not carried over: a, b`."""
    gaps = [r for r in rows if r.status in GAPS]
    defaults = sum(r.status == default_status for r in rows)
    return (f"wrote {out}: {len(rows)} options, {defaults} {defaults_said} written explicitly, {len(gaps)} not carried "
            f"over" + (": " + ", ".join(r.option for r in gaps) if gaps else ""))
