"""Reading the input files as flat kohya options.

- A kohya `--config_file` TOML: kohya flattens one level of sections (`[model_arguments]`, `[optimizer_arguments]`,
  ...; library/train_util.py read_config_from_file), so a key's section does not matter.
- The bmaltais kohya_ss GUI's JSON: its own names and value spellings (numbers as strings, "" for unset, a
  `LoRA_type` instead of `network_module` + `network_args`, LoRA+ and block weights as top-level keys). `gui_options`
  renames them to kohya's (kohya_gui/lora_gui.py builds the same TOML from them when it starts a run).
- A shell script or text file holding the command (`accelerate launch ... train_network.py --flag value ...`,
  lines continued with a backslash, `^` or a backtick): the options after the training script, each `--name` taking the
  words up to the next `--` (none: a switch, true; several: a list, as `--network_args "a=1" "b=2"`).
- A `--dataset_config` TOML or JSON: returned as parsed; dataset.py reads its sections.

Each option keeps the name the input gave it, so the table shows what the user wrote.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

from sdlora.errors import UserError


@dataclass
class Option:
    shown: str  # as the input names it
    name: str  # kohya's option name (or a network_args key when `network_arg`)
    value: object
    network_arg: bool = False
    shown_value: object = None  # the value as the input wrote it, where `value` is a translation (LoRA_type)


def read_text(path: str | Path, what: str) -> tuple[Path, str]:
    """(path, its UTF-8 text, a BOM dropped); missing, unreadable or not UTF-8: a one-line UserError naming `what`."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} not found: {p}")
    try:
        return p, p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {p} is not UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{what} {p} cannot be read: {e.strerror or type(e).__name__}") from None


def read_file(path: str | Path, what: str) -> dict:
    """A TOML or JSON file as a dict; a missing, unreadable or malformed file is a one-line UserError."""
    p, text = read_text(path, what)
    suffix = p.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise UserError(f"{what} {p}: expected a .toml or .json file, got {p.suffix or 'no extension'!r}")
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{what} {p} does not parse: {str(e).splitlines()[0]}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{what} {p} does not parse: {e.msg} (line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {p}: the top level must be a table of options, got {type(data).__name__}")
    return data


def toml_options(data: dict) -> list[Option]:
    """kohya's config file: top-level keys, and the keys of each section, as one flat list."""
    out = []
    for key, value in data.items():
        if isinstance(value, dict):
            out += [Option(f"{key}.{k}", k, v) for k, v in value.items()]
        else:
            out.append(Option(key, key, value))
    return out


def is_gui_json(data: dict) -> bool:
    return any(k in data for k in ("LoRA_type", "max_resolution", "optimizer", "model_list"))


# The GUI's names for kohya options (kohya_gui/lora_gui.py's config_toml_data).
GUI_RENAMES = {"optimizer": "optimizer_type", "max_resolution": "resolution", "sdxl_no_half_vae": "no_half_vae",
               "sdxl_cache_text_encoder_outputs": "cache_text_encoder_outputs",
               "lora_network_weights": "network_weights", "stop_text_encoder_training_pct": "stop_text_encoder_training",
               "lr_warmup": "(GUI) lr_warmup"}
# The GUI keys each LoRA_type turns into `network_args` entries (kohya_gui/lora_gui.py); LoRA+ for every type.
_KOHYA_LORA = {"down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "block_dims",
               "block_alphas", "conv_block_dims", "conv_block_alphas", "rank_dropout", "module_dropout"}
_LYCORIS = {"LyCORIS_preset", "conv_dim", "conv_alpha", "use_tucker", "rank_dropout", "bypass_mode", "dora_wd",
            "module_dropout", "use_scalar", "rank_dropout_scale", "train_norm"}
_NATIVE = {"conv_dim", "conv_alpha", "use_tucker", "rank_dropout", "module_dropout"}
LORAPLUS = {"loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"}
# LoRA_type -> (network_module, network_args it adds, GUI keys it passes as network_args)
GUI_LORA_TYPES = {"Standard": ("networks.lora", {}, _KOHYA_LORA),
                  "Kohya LoCon": ("networks.lora", {}, _KOHYA_LORA | {"conv_dim", "conv_alpha"}),
                  "LoRA-FA": ("networks.lora_fa", {}, _KOHYA_LORA), "Kohya LoHa": ("networks.loha", {}, _NATIVE),
                  "Kohya LoKr": ("networks.lokr", {}, _NATIVE | {"factor"}),
                  "LoCon": ("lycoris.kohya", {"algo": "locon"}, _LYCORIS),
                  "LyCORIS/LoCon": ("lycoris.kohya", {"algo": "locon"}, _LYCORIS),
                  "LyCORIS/LoHa": ("lycoris.kohya", {"algo": "loha"}, _LYCORIS),
                  "LyCORIS/LoKr": ("lycoris.kohya", {"algo": "lokr"}, _LYCORIS | {"factor", "use_cp", "decompose_both"})}
GUI_NETWORK_KEYS = set().union(*(keys for _, _, keys in GUI_LORA_TYPES.values())) | {
    "constrain", "rescaled", "unit", "train_on_input", "factor", "use_cp", "decompose_both"}
GUI_ARG_NAMES = {"LyCORIS_preset": "preset", "constrain": "constraint"}


def _number(value) -> float:
    try:
        return float(value or 0)
    except (TypeError, ValueError):
        return 0.0


def gui_options(data: dict) -> list[Option]:
    """The GUI's JSON as kohya options, in the file's order. `LoRA_type` becomes `network_module` (and an `algo`
    network arg); the network keys that type passes become network args; the others are shown as not passed. The
    GUI's learning-rate rule (lora_gui.py resolve_network_train_flags) is kept: text_encoder_lr 0 with a UNet rate
    trains the UNet only, unet_lr 0 with a text-encoder rate the text encoder only."""
    lora_type = str(data.get("LoRA_type") or "Standard")
    module, extra, passed = GUI_LORA_TYPES.get(lora_type, (f"(GUI LoRA_type {lora_type})", {}, set()))
    out = []
    for key, value in data.items():
        if key == "LoRA_type":
            out.append(Option(key, "network_module", module, shown_value=value))
            out += [Option(f"{key} -> {k}", k, v, network_arg=True) for k, v in extra.items()]
        elif key in LORAPLUS or key in passed:
            out.append(Option(key, GUI_ARG_NAMES.get(key, key), value, network_arg=True))
        elif key in GUI_NETWORK_KEYS:
            out.append(Option(key, f"(GUI: not passed for LoRA_type {lora_type})", value))
        elif key in ("sdxl_no_half_vae", "sdxl_cache_text_encoder_outputs") and str(data.get("sdxl")).lower() != "true":
            out.append(Option(key, "(GUI: passed only with sdxl true)", value))
        elif key in ("unet_lr", "text_encoder_lr") and _number(value) == 0:
            out.append(Option(key, "(GUI: 0 is unset; learning_rate applies)", value))
        else:
            out.append(Option(key, GUI_RENAMES.get(key, key), value))
    te, unet = _number(data.get("text_encoder_lr")), _number(data.get("unet_lr"))
    if te == 0 and unet != 0:
        out.append(Option("(GUI) text_encoder_lr 0 with unet_lr set", "network_train_unet_only", True))
    if unet == 0 and te != 0:
        out.append(Option("(GUI) unet_lr 0 with text_encoder_lr set", "network_train_text_encoder_only", True))
    return out


COMMAND_SUFFIXES = (".sh", ".bash", ".bat", ".cmd", ".ps1", ".txt")
TRAINING_SCRIPT = re.compile(r"(^|[/\\])(sdxl_)?train_network\.py$")


def command_options(text: str) -> tuple[list[Option], bool]:
    """(options, is it sdxl_train_network.py) of a kohya command line."""
    joined = re.sub(r"[\\^`][ \t]*\r?\n", " ", text)
    try:
        words = shlex.split(joined, comments=True)
    except ValueError as e:
        raise UserError(f"kohya command does not parse: {e}") from None
    script = next((i for i, w in enumerate(words) if TRAINING_SCRIPT.search(w)), None)
    if script is None:
        raise UserError("kohya command: no train_network.py or sdxl_train_network.py in it (sdlora imports LoRA "
                        "training commands)")
    out: list[Option] = []
    for word in words[script + 1:]:
        if word.startswith("--"):
            name, eq, value = word[2:].partition("=")
            out.append(Option(f"--{name}", name, [value] if eq else []))
        elif out:
            out[-1].value.append(word)
        else:
            raise UserError(f"kohya command: {word!r} after the script is not an --option")
    for option in out:
        values = option.value
        option.value = True if not values else values[0] if len(values) == 1 else values
    return out, bool(TRAINING_SCRIPT.search(words[script]).group(2))


def read_options(path: str | Path) -> tuple[list[Option], bool]:
    """(options, is_gui) of a kohya config TOML, a GUI JSON or a command line (an `sdxl` option is added for
    sdxl_train_network.py)."""
    if Path(path).suffix.lower() in COMMAND_SUFFIXES:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"kohya command {p} cannot be read: {e}") from None
        options, sdxl = command_options(text)
        return options + ([Option("(script) sdxl_train_network.py", "sdxl", True)] if sdxl else []), False
    data = read_file(path, "kohya config")
    if Path(path).suffix.lower() == ".json":
        if not is_gui_json(data):
            raise UserError(f"kohya config {path}: a JSON file that is not a kohya_ss GUI config (no LoRA_type, "
                            "optimizer or max_resolution key); kohya's own --config_file is TOML")
        return gui_options(data), True
    return toml_options(data), False
