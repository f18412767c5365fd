"""OneTrainer's loss and noise options (TrainConfig.py: the loss strengths, loss_weight_fn, the noise and timestep
options) as `loss.*` and `loss.flow.*`.

OneTrainer's timestep options are shares of the noising range (min_noising_strength 0.1 = timestep 100 of 1000);
for flow models (SD3) they are sigmas. Its LOGIT_NORMAL draw is sigmoid(normal(noising_bias, noising_weight + 1))
(modules/modelSetup/mixin/ModelSetupNoiseMixin.py); sdlora's loss.timestep_sampling follows its draws.
"""

from __future__ import annotations

from sdlora.kohya_import.rules import MAPPED, OFF, UNSUPPORTED, Builder, Custom, Unmappable, as_float, as_str

def loss(v, b: Builder):
    s = {k: as_float(b.options.get(f"{k}_strength", d)) for k, d in
         (("mse", 1.0), ("mae", 0.0), ("log_cosh", 0.0), ("huber", 0.0))}
    used = [k for k, x in s.items() if x != 0]
    if used == ["mse"]:
        return (OFF, "1: sdlora's loss.type mse") if s["mse"] == 1 else \
            (UNSUPPORTED, f"sdlora's loss is not scaled (mse_strength {s['mse']:g}); the rate decides the step size")
    if used == ["mae"]:
        return MAPPED, b.set("loss.type", "l1") + ("" if s["mae"] == 1 else " (its strength is not carried)")
    if used == ["huber"]:
        b.set("loss.type", "huber")
        return MAPPED, "loss.type huber, loss.huber_delta" + ("" if s["huber"] == 1 else " (its strength is not carried)")
    raise Unmappable(f"a mix of {', '.join(used) or 'no'} losses: sdlora's loss is one of mse, l1 (MAE), huber")


def loss_part(kind: str):
    def convert(v, b: Builder):
        return (OFF, "0") if as_float(v) == 0 and kind != "mse" else (MAPPED, "read with mse_strength (see its row)")
    return Custom(convert)


def huber_delta(v, b: Builder):
    if as_float(b.options.get("huber_strength", 0)) == 0:
        return OFF, "huber_strength is 0"
    return MAPPED, b.set("loss.huber_delta", as_float(v))


def loss_weight(v, b: Builder):
    name = as_str(v).upper()
    if name == "CONSTANT":
        return OFF, "CONSTANT"
    if name == "MIN_SNR_GAMMA":
        return MAPPED, b.set("loss.min_snr_gamma", as_float(b.options.get("loss_weight_strength", 5.0)))
    if name == "DEBIASED_ESTIMATION":
        return MAPPED, b.set("loss.debiased_estimation", True)
    raise Unmappable(f"{name}: sdlora weights the loss by min-SNR or debiased estimation only")


def noising(key: str, flow_key: str, scale: float, off: float):
    def convert(v, b: Builder):
        value = as_float(v)
        if value == off:
            return OFF, f"{off:g}"
        if b.state.get("flow"):
            return MAPPED, b.set(flow_key, value)
        return MAPPED, b.set(key, round(value * scale)) + f" = {round(value * scale)} ({value:g} of 1000 timesteps)"
    return Custom(convert)


# OneTrainer's timestep_distribution -> sdlora's draw (loss.timestep_sampling; loss.flow.timestep_sampling for SD3),
# and which of noising_bias / noising_weight it reads: LOGIT_NORMAL sigmoid(normal(bias, weight + 1)), HEAVY_TAIL the
# SD3 paper's f_mode with scale = weight, COS_MAP the cosine map (docs/training.md).
DRAWS = {"UNIFORM": ("uniform", ()), "LOGIT_NORMAL": ("logit_normal", ("noising_bias", "noising_weight")),
         "HEAVY_TAIL": ("mode", ("noising_weight",)), "COS_MAP": ("cosmap", ())}


def distribution(v, b: Builder):
    name = as_str(v).upper()
    if name not in DRAWS:
        raise Unmappable(f"{name}: sdlora draws timesteps uniform, LOGIT_NORMAL, HEAVY_TAIL (mode) or COS_MAP")
    kind = DRAWS[name][0]
    at = "loss.flow." if b.state.get("flow") else "loss."
    if kind == "uniform" and not b.state.get("flow"):
        return OFF, "uniform, as sdlora"
    keys = [b.set(at + "timestep_sampling", kind)]
    if kind == "logit_normal":
        keys.append(b.set(at + "logit_mean", as_float(b.options.get("noising_bias", 0.0))))
        keys.append(b.set(at + "logit_std", as_float(b.options.get("noising_weight", 0.0)) + 1))
    if kind == "mode":
        keys.append(b.set(at + "mode_scale", as_float(b.options.get("noising_weight", 0.0))))
    return MAPPED, ", ".join(keys)


def noising_param(option: str):
    def convert(v, b: Builder):
        name = as_str(b.options.get("timestep_distribution", "UNIFORM")).upper()
        if option in DRAWS.get(name, ("", ()))[1]:
            return MAPPED, "read with timestep_distribution (see its row)"
        return (OFF, "0") if as_float(v) == 0 else (OFF, f"not read by timestep_distribution {name}")
    return Custom(convert)


def shift(v, b: Builder):
    if b.state.get("flow"):
        return MAPPED, b.set("loss.flow.shift", as_float(v))
    return (OFF, "1: no shift") if as_float(v) == 1 else (UNSUPPORTED, "sdlora shifts flow models' sigmas only")
