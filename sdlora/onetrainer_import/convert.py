"""One OneTrainer config through the table: the sdlora config dict, one row per option, notes, and the refusals
(a model type or training method sdlora does not train, concepts it was not given) that stop the import.

Order: the model type and the batch options first (the parts and the epoch length need them), then the concepts,
then the options in the file's order except those that read others (`LATE`), then OneTrainer's defaults the file
left out, then the text encoders' train flags (`parts.finish`). The rows are shown in the file's order.

The concept and sample files the config names are paths chosen by the file: they are read only when the user names
them (--concepts, --samples); otherwise their row says so.
"""

from __future__ import annotations

from pathlib import Path

from sdlora.kohya_import.rules import MAPPED, OFF, UNKNOWN, UNSUPPORTED, Builder, Row, apply
from sdlora.onetrainer_import import data, parts
from sdlora.onetrainer_import.options import ONETRAINER_DEFAULTS, rule
from sdlora.onetrainer_import.read import LISTS, flatten, read_config, read_json

DEFAULT = "OneTrainer default"  # not in the file; OneTrainer's default differs from sdlora's: written explicitly
# Options whose rule reads other options' results: their place in the run (lower first; unlisted: 0).
LATE = {"__version": -3, "training_method": -3, "model_type": -3, "batch_size": -2, "gradient_accumulation_steps": -2,
        "epochs": 1, "learning_rate_warmup_steps": 2, "sample_after": 2, "backup_after": 2, "save_every": 2,
        "validation": 2}


def _lists(raw: dict, name: str, file_option: str, given: str | Path | None, flag: str, what: str,
           b: Builder) -> tuple[list, Row | None]:
    """The concepts (or samples): from the file the user named, else inline, else none (the row says why)."""
    inline = raw.get(name)
    named = raw.get(file_option, "")
    if given is not None:
        b.state[file_option] = (MAPPED, f"not read: {flag} {given} was read instead (the {name}.* rows)")
        items = read_json(given, f"OneTrainer {what} file", list)
        row = Row(name, inline, OFF, f"{flag} given instead") if inline is not None else None
        return items, row
    if isinstance(inline, list):
        b.state[file_option] = (OFF, f"the {name} are inline ({name}.* rows)")
        return inline, None
    if inline is not None:
        return [], Row(name, inline, "invalid value", f"not imported: {name} is a list")
    b.state[file_option] = (UNSUPPORTED, f"not read: a path chosen by the file; name it with {flag} {named}")
    if name == "concepts":
        b.state.setdefault("refused", []).append(
            f"the concepts are in {named!r}, which the config names but the command line does not: add --concepts "
            f"{named} (sdlora reads no path the file chooses)")
    return [], None


def convert(config: str | Path, concepts: str | Path | None = None, samples: str | Path | None = None
            ) -> tuple[dict, list[Row], list[str], list[str]]:
    """(sdlora config dict, rows, notes, refusals) for a OneTrainer config JSON (and its concept / sample files)."""
    raw = read_config(config)
    options = [(k, v) for k, v in flatten({k: v for k, v in raw.items() if k not in LISTS})]
    b = Builder(options=dict(options))
    given = set(b.options)
    for name, value in ONETRAINER_DEFAULTS.items():
        b.options.setdefault(name, value)
    position = {k: i for i, k in enumerate(raw)}  # where the concepts / samples rows go
    entries = options + [(n, ONETRAINER_DEFAULTS[n]) for n in ONETRAINER_DEFAULTS if n not in given]
    order = sorted(range(len(entries)), key=lambda i: (LATE.get(entries[i][0], 0), i))
    rows: list[tuple[float, Row]] = []

    def run(i: int) -> None:
        name, value = entries[i]
        if i >= len(options):
            rows.append((len(raw), _default(name, b)))
        else:
            rows.append((position.get(name.split(".", 1)[0], len(raw)), _row(name, value, b)))

    for i in [i for i in order if LATE.get(entries[i][0], 0) < 0]:
        run(i)
    for name, file_option, given_file, flag, what, fill in (
            ("concepts", "concept_file_name", concepts, "--concepts", "concept", data.concepts),
            ("samples", "sample_definition_file_name", samples, "--samples", "sample", data.samples)):
        items, row = _lists(raw, name, file_option, given_file, flag, what, b)
        list_rows: list[Row] = [row] if row else []
        fill(items, name, b, list_rows)
        if name == "concepts" and b.get("data.subsets") is None and "refused" not in b.state:
            b.state["refused"] = ["no enabled STANDARD concept (the concepts.* rows): no images to train on"]
        at = position.get(name, position.get(file_option, len(raw)))
        rows += [(at, r) for r in list_rows]
    for i in [i for i in order if LATE.get(entries[i][0], 0) >= 0]:
        run(i)
    parts.finish(b)
    return b.data, [r for _, r in sorted(rows, key=lambda x: x[0])], b.notes, b.state.get("refused", [])


def _default(name: str, b: Builder) -> Row:
    row = apply(rule(name), f"(OneTrainer default) {name}", b.options[name], b)
    row.status = DEFAULT if row.status == MAPPED else row.status
    return row


def _row(name: str, value, b: Builder) -> Row:
    found = rule(name)
    if found is None:
        return Row(name, value, UNKNOWN, "not an option of OneTrainer's TrainConfig: not imported")
    return apply(found, name, value, b)
