"""One kohya input through the table: the sdlora config dict, and one row per option of the input.

Order: the data (dataset.py) first, since epoch-based options need the image count; then the options in the
input's order, except those that read others (`LATE`); then kohya's defaults the input left out; then the network
(`network.finish`), which needs every network option. The rows are shown in the input's order.
"""

from __future__ import annotations

from pathlib import Path

from sdlora.errors import UserError
from sdlora.kohya_import import dataset, network
from sdlora.kohya_import.options import KOHYA_DEFAULTS, OPTIONS
from sdlora.kohya_import.read import Option, read_file, read_options
from sdlora.kohya_import.rules import (DEFAULT, MAPPED, OFF, UNKNOWN, UNSUPPORTED, Builder, Row, Unmappable, apply,
                                       is_unset)

# Options whose rule reads other options' results: run after the rest, in this order.
LATE = {"max_train_epochs": 1, "epoch": 1, "lr_warmup_steps": 2, "(GUI) lr_warmup": 2, "save_every_n_epochs": 2,
        "sample_every_n_epochs": 2, "validate_every_n_epochs": 2, "save_last_n_steps": 3, "save_last_n_steps_state": 3,
        "validation_split": 2}
GUI_ONLY = {
    "model_list": "the GUI's model picker", "num_cpu_threads_per_process": "launch setting",
    "gpu_ids": "launch setting", "multi_gpu": "launch setting", "num_machines": "launch setting",
    "num_processes": "launch setting (sdlora: accelerate launch)", "main_process_port": "launch setting",
    "extra_accelerate_launch_args": "launch setting", "dynamo_mode": "speed only", "dynamo_use_fullgraph": "speed only",
    "dynamo_use_dynamic": "speed only", "save_as_bool": "GUI setting", "save_clip": "SD3/Flux only",
    "save_t5xxl": "SD3/Flux only", "no_token_padding": "the GUI's DreamBooth option",
    "learning_rate_te": "the GUI's fine-tuning tab (a LoRA run uses text_encoder_lr)",
    "learning_rate_te1": "the GUI's fine-tuning tab", "learning_rate_te2": "the GUI's fine-tuning tab",
    "sdxl": "no key: sdlora reads SDXL from the model (block weights use SDXL's layout)",
    "noise_offset_type": "selects noise_offset (Original) or multires_noise_* (Multires)",
}
OTHER_FAMILY_PREFIXES = ("flux1_", "flux_", "sd3_", "t5xxl", "clip_", "hunyuan", "anima", "lumina", "chroma", "double_blocks",
                         "single_blocks", "train_blocks", "img_attn", "txt_attn", "img_mlp", "txt_mlp", "blockwise_",
                         "fused_optimizer_groups", "split_qkv", "guidance_", "enable_scaled_pos_embed", "pos_emb")


def convert(config: str | Path, dataset_config: str | Path | None = None, *, sdxl: bool = False
            ) -> tuple[dict, list[Row], list[str]]:
    """(sdlora config dict, rows, notes) for a kohya config TOML or GUI JSON (and its dataset config)."""
    options, gui = read_options(config)
    b = Builder(options={o.name: o.value for o in options if not o.network_arg})
    b.options["_gui"] = gui
    b.state["sdxl"] = sdxl or _true(b.options.get("sdxl"))
    rows: list[tuple[float, Row]] = []
    dataset_path = dataset_config or (None if is_unset(b.options.get("dataset_config")) else b.options["dataset_config"])
    dataset_file = read_file(dataset_path, "dataset config") if dataset_path else None
    data_rows: list[Row] = []
    try:
        dataset.convert_data(b.options, dataset_file, b, data_rows, {o.name: o.shown for o in options})
    except Unmappable as e:
        raise UserError(f"kohya config {config}: {e}") from None
    rows += [(-1, r) for r in data_rows]
    if dataset_path:
        shown = next((o.shown for o in options if o.name == "dataset_config"), "--dataset-config")
        rows.append((-1, Row(shown, str(dataset_path), MAPPED, "read: its options are the rows above")))
    elif "dataset_config" in b.options:
        shown = next(o.shown for o in options if o.name == "dataset_config")
        rows.append((-1, Row(shown, b.options["dataset_config"], OFF, "unset")))
    _noise_offset_type(options, b)
    for name, value in KOHYA_DEFAULTS.items():  # first: anything the input sets overrides them
        epochs = any(not is_unset(b.options.get(k)) and str(b.options[k]) not in ("0", "0.0") for k in ("max_train_epochs", "epoch"))
        if name not in b.options and not (name == "max_train_steps" and epochs):  # kohya: epochs override steps
            row = apply(OPTIONS[name], f"(kohya default) {name}", value, b)
            row.status = DEFAULT if row.status == MAPPED else row.status
            rows.append((len(options), row))
    order = sorted(range(len(options)), key=lambda i: (LATE.get(options[i].name, 0), i))
    for i in order:
        for r in _row(options[i], b, gui):
            r.value = r.value if options[i].shown_value is None else options[i].shown_value
            rows.append((i, r))
    network.finish(b)
    if b.state.get("sdxl") and "lr_rules" in b.data.get("optim", {}):
        b.notes.append("block weights: SDXL's layout (9 down, 3 mid, 9 up)")
    return b.data, [r for _, r in sorted(rows, key=lambda x: x[0])], b.notes


def _true(value) -> bool:
    return value is True or str(value).strip().lower() == "true"


def _row(option: Option, b: Builder, gui: bool) -> list[Row]:
    name, shown, value = option.name, option.shown, option.value
    if option.network_arg:
        return [_network_arg(shown, name, value, b)]
    if name == "network_args":
        rows = [apply(OPTIONS[name], shown, value, b)]
        try:
            pairs = network.entries(value)
        except ValueError as e:
            return [Row(shown, value, "invalid value", f"not imported: {e}")]
        return rows + [_network_arg(f"{shown}.{k}", k, v, b) for k, v in pairs]
    if name == "dataset_config" or OPTIONS.get(name) == "data":
        return []  # rows from dataset.py (or the dataset file's own row)
    if name.startswith("(GUI:"):
        return [Row(shown, value, OFF, name.strip("()"))]
    if gui and is_unset(value):
        return [Row(shown, value, OFF, "unset in the GUI: kohya's default")]
    if gui and b.state.get("dropped", {}).get(name):
        return [Row(shown, value, OFF, b.state["dropped"][name])]
    if name in GUI_ONLY and gui:
        return [Row(shown, value, "no effect", GUI_ONLY[name])]
    if name not in OPTIONS:
        if gui and name.startswith(OTHER_FAMILY_PREFIXES):
            return [Row(shown, value, "no effect", "an option of the GUI's SD3 / Flux / other tabs")]
        if gui and name in ("additional_parameters",):
            return [Row(shown, value, UNSUPPORTED, "raw command-line arguments: put them into a kohya TOML and "
                                                   "import that")]
        if gui and name == "train_inpainting":
            return [Row(shown, value, OFF if not _true(value) else UNSUPPORTED, "sdlora has no inpainting training")]
        return [Row(shown, value, UNKNOWN, "not an option of sd-scripts' train_network.py: not imported")]
    return [apply(OPTIONS[name], shown, value, b)]


def _network_arg(shown: str, name: str, value, b: Builder) -> Row:
    rule = network.NETWORK_ARGS.get(name)
    if rule is None:
        return Row(shown, value, UNKNOWN, "not a network_args key of networks.lora or LyCORIS: not imported")
    if is_unset(value):
        return Row(shown, value, OFF, "unset")
    return apply(rule, shown, value, b)


def _noise_offset_type(options: list[Option], b: Builder) -> None:
    """The GUI passes noise_offset only with noise_offset_type Original, multires_* only with Multires."""
    kind = b.options.get("noise_offset_type")
    if kind is None:
        return
    used = {"noise_offset", "adaptive_noise_scale", "noise_offset_random_strength"} if kind == "Original" else \
        {"multires_noise_iterations", "multires_noise_discount"}
    other = {"noise_offset", "adaptive_noise_scale", "noise_offset_random_strength", "multires_noise_iterations",
             "multires_noise_discount"} - used
    b.state["dropped"] = {n: f"not passed by the GUI with noise_offset_type {kind}" for n in other}
