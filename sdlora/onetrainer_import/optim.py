"""OneTrainer's optimiser object (`optimizer.*`: modules/util/config/TrainConfig.py TrainOptimizerConfig) and its
schedule options as `optim.*`.

The UI stores every optimiser's settings in one object and fills in the chosen optimiser's defaults
(modules/util/optimizer_util.py OPTIMIZER_DEFAULT_PARAMETERS); a field that still holds its OneTrainer default, or
the default of the package sdlora uses, is off; one set otherwise, that sdlora's optimiser does not take, is NOT
SUPPORTED.
"""

from __future__ import annotations

from sdlora.kohya_import.rules import (MAPPED, NO_EFFECT, OFF, UNSUPPORTED, Builder, Invalid, Unmappable, as_bool,
                                       as_float, as_int, as_str)

OPTIMIZERS = {"ADAMW": "adamw", "ADAMW_8BIT": "adamw8bit", "PRODIGY": "prodigy", "ADAFACTOR": "adafactor",
              "LION": "lion", "CAME": "came", "SCHEDULE_FREE_ADAMW": "adamw_schedulefree"}
ITEM_5 = "sdlora's optimisers: ADAMW, ADAMW_8BIT, PRODIGY, ADAFACTOR, LION, CAME, SCHEDULE_FREE_ADAMW"
# The settings of the package each sdlora optimiser builds (optimizer.<field> equal to these: nothing to carry).
PACKAGE_DEFAULTS = {
    "adafactor": {"eps": 1e-30, "eps2": 1e-3, "clip_threshold": 1.0, "decay_rate": -0.8, "beta1": None},  # transformers
    "prodigy": {"decouple": True, "use_bias_correction": False, "safeguard_warmup": False, "d0": 1e-6, "d_coef": 1.0,
                "growth_rate": float("inf"), "slice_p": 1, "beta3": None},  # prodigyopt
    "came": {"eps": 1e-30, "eps2": 1e-16, "beta3": 0.9999},  # pytorch_optimizer CAME (sdlora's third beta)
    "adamw_schedulefree": {"r": 0.0, "weight_lr_power": 2.0},  # pytorch_optimizer ScheduleFreeAdamW
}
TAKES_EPS = ("adamw", "adamw8bit", "prodigy", "adamw_schedulefree")
# Fields that change speed or memory only (or that sdlora's fp32 adapter weights make moot).
SPEED = {"foreach", "fused", "capturable", "fused_back_pass", "is_paged", "fsdp_in_use", "stochastic_rounding",
         "use_triton", "compile", "differentiable", "optim_bits", "min_8bit_size", "percentile_clipping",
         "block_wise", "quant_block_size", "log_every"}
# OneTrainer's own defaults of every field (TrainOptimizerConfig.default_values): None / False unless listed.
ONETRAINER_TRUE = {"stochastic_rounding", "weight_decay_by_lr", "split_groups", "split_groups_mean", "factored",
                   "factored_fp32", "use_stableadamw", "d_limiter", "use_schedulefree", "rms_rescaling"}


def _kind(b: Builder) -> str | None:
    return OPTIMIZERS.get(as_str(b.options.get("optimizer.optimizer", "ADAMW")).upper())


def optimizer(v, b: Builder):
    name = as_str(v).upper()
    if name not in OPTIMIZERS:
        raise Unmappable(f"{v!r}: {ITEM_5}")
    kind = OPTIMIZERS[name]
    if kind == "adafactor" and any(as_bool(b.options.get(f"optimizer.{k}", False))
                                   for k in ("relative_step", "scale_parameter", "warmup_init")):
        raise Unmappable("ADAFACTOR with relative_step / scale_parameter / warmup_init on: sdlora's Adafactor uses "
                         "the given rate with them off")
    keys = [b.set("optim.optimizer", kind)]
    if "optimizer.weight_decay" not in b.options or b.options["optimizer.weight_decay"] is None:
        decay = 0.01 if kind in ("adamw", "adamw8bit") else 0.0  # torch's / bitsandbytes' AdamW default
        keys.append(b.set("optim.weight_decay", decay) + f" = {decay:g} (the optimiser's default)")
    return MAPPED, ", ".join(keys)


def field(name: str):
    """The rule of `optimizer.<name>` (every field but `optimizer` itself)."""
    def convert(v, b: Builder):
        kind = _kind(b)
        if kind is None:
            return OFF, "read with optimizer.optimizer (not carried over)"
        if name == "weight_decay":
            return (OFF, "unset: the optimiser's default") if v is None else (MAPPED, b.set("optim.weight_decay", as_float(v)))
        if name in ("beta1", "beta2") and kind != "adafactor":
            if v is None:
                return OFF, "unset: the optimiser's default"
            betas = list(b.get("optim.betas") or _default_betas(kind))
            betas[0 if name == "beta1" else 1] = as_float(v)
            return MAPPED, b.set("optim.betas", betas)
        if name == "eps" and kind in TAKES_EPS:
            return (OFF, "unset") if v is None else (MAPPED, b.set("optim.eps", as_float(v)))
        if name in SPEED:
            return NO_EFFECT, "speed or memory only (sdlora keeps adapter weights in fp32)"
        package = PACKAGE_DEFAULTS.get(kind, {})
        if name in package and _same(v, package[name]):
            return OFF, f"the default of sdlora's {kind}"
        if name in ("relative_step", "scale_parameter", "warmup_init") and kind == "adafactor":
            return (MAPPED, "off, as sdlora's Adafactor") if not as_bool(v) else (UNSUPPORTED, "see optimizer.optimizer")
        if v is None or v is False or v == {} or (v is True and name in ONETRAINER_TRUE):
            return OFF, "unset / OneTrainer's default"
        return UNSUPPORTED, f"sdlora's {kind} takes betas, eps and weight_decay only"
    return convert


def _same(a, b) -> bool:
    if a is None or b is None or isinstance(a, bool) or isinstance(b, bool):
        return a == b
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def _default_betas(kind: str) -> list[float]:
    return [0.9, 0.99] if kind == "lion" else [0.9, 0.999]


# ------------------------------------------------------------------------------------------ the schedule
def scheduler(v, b: Builder):
    name = as_str(v).upper()
    if _kind(b) == "adamw_schedulefree":
        return MAPPED, b.set("optim.scheduler", "constant") + " (OneTrainer forces schedule-free optimisers to CONSTANT)"
    if name in ("CONSTANT", "LINEAR", "COSINE"):
        return MAPPED, b.set("optim.scheduler", name.lower())
    if name in ("COSINE_WITH_RESTARTS", "COSINE_WITH_HARD_RESTARTS") and as_float(b.options.get("learning_rate_cycles", 1)) == 1:
        return MAPPED, b.set("optim.scheduler", "cosine") + " (one cycle = cosine)"
    raise Unmappable(f"{v!r}: sdlora's schedules are CONSTANT, LINEAR, COSINE (one cycle), each after a linear warm-up")


def cycles(v, b: Builder):
    if as_float(v) == 1:
        return OFF, "1 cycle"
    if as_str(b.options.get("learning_rate_scheduler", "CONSTANT")).upper() in ("CONSTANT", "LINEAR", "COSINE"):
        return OFF, "not read by this learning_rate_scheduler"
    return UNSUPPORTED, "sdlora's cosine has one cycle"


def min_factor(v, b: Builder):
    return (OFF, "0") if as_float(v) == 0 else (UNSUPPORTED, "sdlora's schedules end at 0")


def warmup(v, b: Builder):
    """OneTrainer (modules/util/create.py create_lr_scheduler): above 1, steps (counted in micro-batches: divided by
    gradient_accumulation_steps); from 0 to 1, a share of the training steps; else none."""
    raw = as_float(v)
    if raw <= 0:
        return OFF, "0"
    if raw > 1:
        steps = int(raw / b.get("train.gradient_accumulation_steps", 1))
        total = b.get("train.max_steps")
        if total is not None and steps > total:  # OneTrainer runs it; the rate never reaches learning_rate
            b.set("optim.warmup_steps", total)
            return UNSUPPORTED, (f"{steps} warm-up steps in a run of {total}: sdlora's warm-up ends within the run, "
                                 f"optim.warmup_steps = {total} written")
        return MAPPED, b.set("optim.warmup_steps", steps) + (f" = {steps}" if steps != raw else "")
    total = b.get("train.max_steps")
    if total is None:
        raise Unmappable("a share of the training steps, whose number is unknown (see epochs); set optim.warmup_steps")
    steps = int(raw * total)
    return MAPPED, b.set("optim.warmup_steps", steps) + f" = {steps} ({raw:g} of train.max_steps)"


def learning_rate_scaler(v, b: Builder):
    return (OFF, "NONE") if as_str(v).upper() == "NONE" else \
        (UNSUPPORTED, "sdlora takes the rate as given (no scaling by batch size or accumulation)")


def clip_grad_norm(v, b: Builder):
    if v is None:
        return MAPPED, b.set("optim.max_grad_norm", None) + " = null (no clipping)"
    norm = as_float(v)
    return MAPPED, b.set("optim.max_grad_norm", norm if norm > 0 else None)


def custom_scheduler(v, b: Builder):
    if v in (None, "", []):
        return OFF, "unset"
    if isinstance(v, list) and as_str(b.options.get("learning_rate_scheduler", "")).upper() != "CUSTOM":
        return OFF, "only with learning_rate_scheduler CUSTOM"
    return UNSUPPORTED, "sdlora's schedules are constant, linear, cosine (no custom class)"


def as_count(v) -> int:
    n = as_int(v)
    if n < 0:
        raise Invalid(f"{v!r} is negative")
    return n
