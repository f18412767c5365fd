"""OneTrainer's loss and noise options (TrainConfig.py: the loss strengths, loss_weight_fn, the noise and timestep
options) as `loss.*` and `loss.flow.*`.

OneTrainer's timestep options are shares of the noising range (min_noising_strength 0.1 = timestep 100 of 1000);
for flow models (SD3) they are sigmas. Its LOGIT_NORMAL draw is sigmoid(normal(noising_bias, noising_weight + 1))
(modules/modelSetup/mixin/ModelSetupNoiseMixin.py).
"""

from __future__ import annotations

from sdlora.kohya_import.rules import MAPPED, OFF, UNSUPPORTED, Builder, Custom, Unmappable, as_float, as_str

ITEM_4 = "sdlora has no such loss or noise option yet (issue 29 item 4)"


def loss(v, b: Builder):
    s = {k: as_float(b.options.get(f"{k}_strength", d)) for k, d in
         (("mse", 1.0), ("mae", 0.0), ("log_cosh", 0.0), ("huber", 0.0))}
    used = [k for k, x in s.items() if x != 0]
    if used == ["mse"]:
        return (OFF, "1: sdlora's loss.type mse") if s["mse"] == 1 else \
            (UNSUPPORTED, f"sdlora's loss is not scaled (mse_strength {s['mse']:g}); the rate decides the step size")
    if used == ["huber"]:
        b.set("loss.type", "huber")
        return MAPPED, "loss.type huber, loss.huber_delta" + ("" if s["huber"] == 1 else " (its strength is not carried)")
    raise Unmappable(f"a mix of {', '.join(used) or 'no'} losses: sdlora's loss is mse or huber alone")


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
    raise Unmappable(f"{name}: sdlora weights the loss by min-SNR only ({ITEM_4})")


def noising(key: str, flow_key: str, scale: float, off: float):
    def convert(v, b: Builder):
        value = as_float(v)
        if value == off:
            return OFF, f"{off:g}"
        if b.state.get("flow"):
            return MAPPED, b.set(flow_key, value)
        return MAPPED, b.set(key, round(value * scale)) + f" = {round(value * scale)} ({value:g} of 1000 timesteps)"
    return Custom(convert)


def distribution(v, b: Builder):
    name = as_str(v).upper()
    if not b.state.get("flow"):
        if name == "UNIFORM":
            return OFF, "uniform, as sdlora"
        raise Unmappable(f"{name}: sdlora draws SD 1.x/2.x/SDXL timesteps uniformly ({ITEM_4})")
    kind = {"UNIFORM": "uniform", "LOGIT_NORMAL": "logit_normal", "COS_MAP": "cosmap"}.get(name)
    if kind is None:
        raise Unmappable(f"{name}: sdlora's flow sigma draws are uniform, logit_normal, mode, cosmap")
    keys = [b.set("loss.flow.timestep_sampling", kind)]
    if kind == "logit_normal":  # OneTrainer: normal(noising_bias, noising_weight + 1), then the sigmoid
        keys.append(b.set("loss.flow.logit_mean", as_float(b.options.get("noising_bias", 0.0))))
        keys.append(b.set("loss.flow.logit_std", as_float(b.options.get("noising_weight", 0.0)) + 1))
    return MAPPED, ", ".join(keys)


def noising_param(v, b: Builder):
    flow, name = b.state.get("flow"), as_str(b.options.get("timestep_distribution", "UNIFORM")).upper()
    if flow and name == "LOGIT_NORMAL":
        return MAPPED, "read with timestep_distribution (see its row)"
    return (OFF, "0") if as_float(v) == 0 else (OFF, f"not read by timestep_distribution {name}")


def shift(v, b: Builder):
    if b.state.get("flow"):
        return MAPPED, b.set("loss.flow.shift", as_float(v))
    return (OFF, "1: no shift") if as_float(v) == 1 else (UNSUPPORTED, "sdlora shifts flow models' sigmas only")
