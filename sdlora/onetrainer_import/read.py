"""Reading OneTrainer's files: its saved training config (`TrainConfig.to_dict()` as the UI's "save config" and its
presets write it: modules/util/config/TrainConfig.py), a concept file (a JSON list of `ConceptConfig`) and a sample
file (a JSON list of `SampleConfig`).

The config nests: the per-part settings (`unet`, `text_encoder`, `text_encoder_2`, ...), `optimizer`,
`quantization`, `embedding` and `cloud` are objects, `concepts` and `samples` lists (or null, when they live in the
files `concept_file_name` / `sample_definition_file_name` name). `flatten` turns the objects into dotted options
(`unet.learning_rate`, `optimizer.weight_decay`) so each gets its own row; the lists are data.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

from sdlora.errors import UserError
from sdlora.kohya_import.read import read_text

LISTS = ("concepts", "samples")  # data.py's
LEAF_OBJECTS = ("optimizer_defaults", "optimizer.muon_adam_config", "secrets")  # objects shown as one row


def read_json(path: str | Path, what: str, kind: type):
    """A JSON file holding a `kind` (dict or list); missing, unreadable, malformed or of another shape: UserError."""
    p, text = read_text(path, what)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{what} {p} does not parse as JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, kind):
        shape = "an object ({...})" if kind is dict else "a list ([...])"
        raise UserError(f"{what} {p}: expected {shape}, got {type(data).__name__}")
    return data


def read_config(path: str | Path) -> dict:
    """The training config; it must look like OneTrainer's (a `__version`, a `model_type` or a `training_method`)."""
    data = read_json(path, "OneTrainer config", dict)
    if not any(k in data for k in ("__version", "model_type", "training_method", "base_model_name")):
        raise UserError(f"OneTrainer config {path}: no __version, model_type, training_method or base_model_name: "
                        "not a config saved by OneTrainer")
    return data


def flatten(data: dict, prefix: str = "") -> list[tuple[str, object]]:
    """[(dotted name, value)] in the file's order; objects (other than LEAF_OBJECTS) become their fields."""
    out = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name not in LEAF_OBJECTS:
            out += flatten(value, name + ".") if value else [(name, value)]
        else:
            out.append((name, value))
    return out
