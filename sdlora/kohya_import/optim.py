"""kohya's learning rates, optimiser and schedule options as `optim.*` (the converters of options.py's table)."""

from __future__ import annotations

from sdlora.kohya_import.rules import (MAPPED, OFF, Builder, Custom, Invalid, Unmappable, as_bool, as_float, as_int,
                                       as_list, as_str, key_values)

ITEM_5 = "sdlora's optimisers: AdamW, AdamW8bit, Prodigy, Adafactor, Lion, CAME, AdamWScheduleFree"
# kohya's optimizer_type (lower case; it also takes a `module.Class` path) -> optim.optimizer
SDLORA_OPTIMIZERS = {"adamw": "adamw", "adamw8bit": "adamw8bit", "prodigy": "prodigy",
                     "bitsandbytes.optim.adamw8bit": "adamw8bit", "prodigyopt.prodigy": "prodigy",
                     "adafactor": "adafactor", "transformers.optimization.adafactor": "adafactor",
                     "lion": "lion", "lion_pytorch.lion": "lion", "pytorch_optimizer.lion": "lion",
                     "came": "came", "came_pytorch.came": "came", "pytorch_optimizer.came": "came",
                     "adamwschedulefree": "adamw_schedulefree", "schedulefree.adamwschedulefree": "adamw_schedulefree",
                     "pytorch_optimizer.schedulefreeadamw": "adamw_schedulefree"}
TORCH_ADAMW_WEIGHT_DECAY = 0.01  # torch.optim.AdamW's and bitsandbytes' AdamW8bit default; the others' is 0
# kohya's Adafactor takes relative_step (default on: the rate is ignored) and scale_parameter from optimizer_args;
# sdlora's is the LoRA recipe with them off.
ADAFACTOR_OFF = ("relative_step", "scale_parameter", "warmup_init")
KOHYA_MAX_TRAIN_STEPS = 1600  # kohya's default when neither steps nor epochs are given


# ---------------------------------------------------------------------------------------- learning rates
def _given(b: Builder, option: str) -> bool:
    value = b.options.get(option)
    if value is None or value == "" or value == []:
        return False
    try:
        return as_float(value[0] if isinstance(value, list) else value) != 0 or (
            option == "text_encoder_lr" and not b.options.get("_gui"))  # kohya reads a 0 as a rate; the GUI as unset
    except Invalid:
        return True


def learning_rate(v, b: Builder):
    lr, keys = as_float(v), []
    if not _given(b, "unet_lr"):
        keys.append(b.set("optim.lr", lr))
    if not _given(b, "text_encoder_lr"):
        keys.append(b.set("optim.text_encoder_lr", lr))
    return MAPPED, ", ".join(keys) if keys else "overridden by unet_lr and text_encoder_lr"


def text_encoder_lr(v, b: Builder):
    rates = [as_float(x) for x in (v if isinstance(v, list) else [v])]
    if not rates:
        return OFF, "empty list: learning_rate"
    keys = [b.set("optim.text_encoder_lr", rates[0])]
    if len(rates) > 1:
        keys.append(b.set("optim.text_encoder_2_lr", rates[1]))
    return MAPPED, ", ".join(keys)


def _optimizer_arg_keys(b: Builder) -> dict:
    try:
        return dict(key_values(as_list(b.options.get("optimizer_args") or []), "optimizer_args"))
    except Invalid:
        return {}


def optimizer(v, b: Builder):
    name = as_str(v).strip().lower() or "adamw"
    if name not in SDLORA_OPTIMIZERS:
        raise Unmappable(f"{v!r}: {ITEM_5}")
    kind = SDLORA_OPTIMIZERS[name]
    args = _optimizer_arg_keys(b)
    if kind == "adafactor" and any(args.get(k, "true" if k == "relative_step" else "").lower() == "true"
                                   for k in ADAFACTOR_OFF):
        raise Unmappable("Adafactor with relative_step / scale_parameter / warmup_init on: sdlora's Adafactor uses "
                         "the given rate with them off (optimizer_args relative_step=False scale_parameter=False "
                         "warmup_init=False)")
    b.set("optim.optimizer", kind)
    if "weight_decay" not in args:  # kohya passes none: the optimiser's own default
        decay = TORCH_ADAMW_WEIGHT_DECAY if kind in ("adamw", "adamw8bit") else 0.0
        b.set("optim.weight_decay", decay)
        return MAPPED, f"optim.optimizer, optim.weight_decay {decay:g} (the optimiser's default)"
    return MAPPED, "optim.optimizer"


def legacy_optimizer(kind: str):
    def convert(v, b: Builder):
        if not as_bool(v):
            return OFF, "false"
        return optimizer(kind, b)
    return Custom(convert, "optim.optimizer")


# Prodigy's and AdamW's arguments sdlora exposes; the rest are NOT SUPPORTED unless they equal the package default.
PRODIGY_DEFAULTS = {"decouple": "true", "use_bias_correction": "false", "safeguard_warmup": "false", "d0": "1e-6",
                    "d_coef": "1.0", "growth_rate": "inf", "slice_p": "1"}


def optimizer_args(v, b: Builder):
    details, gaps = [], []
    for key, raw in key_values(as_list(v), "optimizer_args"):
        if key == "weight_decay":
            details.append(b.set("optim.weight_decay", as_float(raw)))
        elif key == "eps":
            details.append(b.set("optim.eps", as_float(raw)))
        elif key == "betas":
            betas = [as_float(x) for x in raw.strip("()[]").split(",") if x.strip()]
            if len(betas) < 2:
                raise Invalid(f"optimizer_args betas={raw!r}: two numbers expected")
            details.append(b.set("optim.betas", betas[:2]))
        elif key in PRODIGY_DEFAULTS and _same_number(raw, PRODIGY_DEFAULTS[key]):
            details.append(f"{key}={raw} is Prodigy's default")
        elif key in ADAFACTOR_OFF and raw.lower() == "false":
            details.append(f"{key}={raw} (sdlora's Adafactor)")
        else:
            gaps.append(f"{key}={raw}")
    if gaps:
        raise Unmappable(f"{', '.join(gaps)}: sdlora's optimisers take betas, eps and weight_decay only"
                         + (f" (mapped: {', '.join(details)})" if details else ""))
    return MAPPED, ", ".join(details)


def _same_number(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return a.strip().lower() == b


# ------------------------------------------------------------------------------------------ the schedule
def scheduler(v, b: Builder):
    name = as_str(v).strip().lower()
    cycles = b.options.get("lr_scheduler_num_cycles")
    power = b.options.get("lr_scheduler_power")
    if name in ("constant", "constant_with_warmup", "cosine", "linear"):
        kind = {"constant_with_warmup": "constant"}.get(name, name)
        return MAPPED, b.set("optim.scheduler", kind)
    if name == "cosine_with_restarts" and (cycles in (None, "") or as_int(cycles) == 1):
        return MAPPED, b.set("optim.scheduler", "cosine") + " (one cycle = cosine)"
    if name == "polynomial" and (power in (None, "") or as_float(power) == 1):
        return MAPPED, b.set("optim.scheduler", "linear") + " (power 1; kohya ends at 1e-7, sdlora at 0)"
    raise Unmappable(f"{v!r}: sdlora's schedules are constant, cosine (one cycle), linear, each after a linear warm-up")


def scheduler_part(reader, neutral, used_by: tuple[str, ...]):
    def convert(v, b: Builder):
        scheduler = as_str(b.options.get("lr_scheduler") or "constant").strip().lower()
        if scheduler in used_by:
            return MAPPED, "read with lr_scheduler (see its row)"
        if v in ("", None) or reader(v) == neutral:
            return OFF, f"not read by lr_scheduler {scheduler}"
        return OFF, f"not read by lr_scheduler {scheduler} (only by {', '.join(used_by)})"
    return Custom(convert)


def warmup(v, b: Builder):
    raw = as_float(v)
    if raw == 0:
        return OFF, "0"
    if raw < 1:  # kohya: a float below 1 is a share of the training steps
        steps = int(raw * b.get("train.max_steps", KOHYA_MAX_TRAIN_STEPS))
        return MAPPED, b.set("optim.warmup_steps", steps) + f" = {steps} ({raw:g} of train.max_steps)"
    if as_str(b.options.get("lr_scheduler", "constant")).lower() == "constant":
        b.notes.append("kohya refuses warm-up with lr_scheduler=constant; sdlora warms up, then holds the rate")
    return MAPPED, b.set("optim.warmup_steps", as_int(raw))
