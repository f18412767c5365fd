"""OneTrainer's model types as sdlora's families, and its per-part settings (`unet.*`, `transformer.*`,
`text_encoder.*`, `text_encoder_2.*`, `vae.*`, ...: TrainConfig.py TrainModelPartConfig) as sdlora keys.

sdlora reads the family from the model itself (model.path); `model_type` only decides which parts exist and refuses
the model types sdlora does not train. A part the family does not have (`prior`, `decoder`, ... for SD) has no
effect: OneTrainer saves every part's settings whatever the model type.
"""

from __future__ import annotations

from sdlora.kohya_import.rules import (MAPPED, NO_EFFECT, OFF, UNKNOWN, UNSUPPORTED, Builder, Invalid, Unmappable,
                                       as_bool, as_float, as_str)

SD = ("unet", "text_encoder", "vae")
FLOW = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")
# model_type -> (what sdlora calls it, the parts OneTrainer trains or loads for it, rectified flow)
FAMILIES = {
    "STABLE_DIFFUSION_15": ("SD 1.5", SD, False),
    "STABLE_DIFFUSION_20": ("SD 2.0 (768, v-prediction)", SD, False),
    "STABLE_DIFFUSION_20_BASE": ("SD 2.0 base", SD, False),
    "STABLE_DIFFUSION_21": ("SD 2.1 (768, v-prediction)", SD, False),
    "STABLE_DIFFUSION_21_BASE": ("SD 2.1 base", SD, False),
    "STABLE_DIFFUSION_XL_10_BASE": ("SDXL", SD + ("text_encoder_2",), False),
    "STABLE_DIFFUSION_3": ("SD3", FLOW, True),
    "STABLE_DIFFUSION_35": ("SD3.5", FLOW, True),
}
INPAINTING = ("STABLE_DIFFUSION_15_INPAINTING", "STABLE_DIFFUSION_20_INPAINTING", "STABLE_DIFFUSION_20_DEPTH",
              "STABLE_DIFFUSION_XL_10_BASE_INPAINTING")
ALLOWED = "SD 1.5, SD 2.0/2.1 (and base), SDXL 1.0 base, SD3, SD3.5"
DENOISERS = ("unet", "transformer")
ALL_PARTS = ("unet", "prior", "transformer", "unconditional_transformer", "text_encoder", "text_encoder_2",
             "text_encoder_3", "text_encoder_4", "vae", "effnet_encoder", "decoder", "decoder_text_encoder",
             "decoder_vqgan")
BASE_PRECISION = {"FLOAT_8": "fp8", "INT_8": "int8"}
FULL = ("FLOAT_32", "FLOAT_16", "BFLOAT_16", "TFLOAT_32", "NONE")
SPEED = "speed or memory only: sdlora's own choice"


def model_type(v, b: Builder):
    name = as_str(v).upper()
    if name in FAMILIES:
        label, parts, flow = FAMILIES[name]
        b.state.update(family=label, parts=parts, flow=flow)
        return MAPPED, f"no key: sdlora reads {label} from model.path"
    b.state["parts"] = ()
    why = ("sdlora trains text-to-image models, not inpainting or depth-conditioned ones" if name in INPAINTING
           else f"sdlora does not train this model type ({ALLOWED})")
    b.state.setdefault("refused", []).append(f"model_type {name}: {why}")
    raise Unmappable(why)


def training_method(v, b: Builder):
    name = as_str(v).upper()
    if name == "LORA":
        return MAPPED, "no key: sdlora trains adapters"
    why = {"FINE_TUNE": "a full fine-tune", "EMBEDDING": "a textual-inversion embedding",
           "FINE_TUNE_VAE": "a VAE fine-tune"}.get(name, "this training method")
    b.state.setdefault("refused", []).append(f"training_method {name}: sdlora trains LoRA-style adapters, not {why}")
    raise Unmappable(f"sdlora trains LoRA-style adapters (LORA), not {why}")


def _denoiser(b: Builder) -> str:
    return next((p for p in b.state.get("parts", ()) if p in DENOISERS), "unet")


def part_field(part: str, name: str):
    """The rule of `<part>.<name>`."""
    def convert(v, b: Builder):
        parts = b.state.get("parts", ())
        if part not in parts:
            return NO_EFFECT, f"not a part of {b.state.get('family', 'this model type')}"
        return _part_field(part, name, v, b)
    return convert


def _on(v) -> bool:
    """gradient_checkpointing: a bool in old configs, OFF / ON / CPU_OFFLOADED since config version 5."""
    if isinstance(v, str) and v.upper() in ("OFF", "ON", "CPU_OFFLOADED"):
        return v.upper() != "OFF"
    return as_bool(v)


def _part_field(part: str, name: str, v, b: Builder):
    denoiser, encoder = part in DENOISERS, part.startswith("text_encoder")
    if name == "model_name":
        if not as_str(v or ""):
            return OFF, "empty: from base_model_name"
        if part == "vae":
            return MAPPED, b.set("model.vae_path", as_str(v))
        raise Unmappable("sdlora loads this part from model.path")
    if name == "include":
        return (OFF, "loaded") if as_bool(v) else (UNSUPPORTED, "sdlora loads every part the model has")
    if name == "train":
        if denoiser:
            return (MAPPED, "no key: sdlora trains it") if as_bool(v) else \
                (UNSUPPORTED, "sdlora always trains the denoiser's adapters")
        if encoder:
            b.state.setdefault("trained_encoders", {})[part] = as_bool(v)
            return MAPPED, "text_encoder.train / text_encoder.train_parts"
        return (OFF, "false") if not as_bool(v) else (UNSUPPORTED, "sdlora does not train the VAE")
    if name == "stop_training_after":
        unit = as_str(b.options.get(f"{part}.stop_training_after_unit", "NEVER")).upper()
        return (OFF, "never") if v is None or unit == "NEVER" else \
            (UNSUPPORTED, "sdlora trains each part for the whole run")
    if name == "stop_training_after_unit":
        return (OFF, "never") if as_str(v).upper() == "NEVER" else (MAPPED, "read with stop_training_after")
    if name == "learning_rate":
        if v is None:
            return OFF, "unset: the global learning_rate"
        key = "optim.lr" if denoiser else "optim.text_encoder_lr" if part == "text_encoder" else f"optim.part_lr.{part}"
        if not (denoiser or encoder):
            return OFF, "the part is not trained"
        return MAPPED, b.set(key, as_float(v))
    if name == "weight_dtype":
        return _weight_dtype(part, as_str(v).upper(), b)
    if name == "dropout_probability":
        p = as_float(v)
        if p == 0:
            return OFF, "0"
        if encoder and part == "text_encoder":
            return MAPPED, b.set("data.caption_dropout", p) + " (dropping the caption: every text encoder's input)"
        if encoder and p == as_float(b.options.get("text_encoder.dropout_probability", 0)):
            return MAPPED, "the same as text_encoder.dropout_probability (data.caption_dropout)"
        return UNSUPPORTED, "sdlora drops the whole caption (data.caption_dropout), not one encoder's output"
    if name in ("train_embedding",):
        return NO_EFFECT, "only with additional_embeddings"
    if name == "attention_mask":
        return (OFF, "false") if not as_bool(v) else (UNSUPPORTED, "sdlora does not mask the text encoder's padding")
    if name == "guidance_scale":
        return NO_EFFECT, "only for guidance-distilled models (Flux)"
    if name == "gradient_checkpointing":
        if not _on(v):
            return OFF, "off"
        if denoiser:
            return MAPPED, b.set("train.gradient_checkpointing", True)
        return NO_EFFECT, "sdlora checkpoints the denoiser only (memory)"
    if name in ("offload_fraction", "activation_offloading"):
        return NO_EFFECT, SPEED
    return UNKNOWN, "not a field of OneTrainer's TrainModelPartConfig: not imported"


def _weight_dtype(part: str, dtype: str, b: Builder):
    if part == "vae":
        return NO_EFFECT, "sdlora keeps the VAE in train.mixed_precision's dtype"
    if dtype in FULL:
        if part in DENOISERS:
            return OFF, "full precision: frozen weights in train.mixed_precision's dtype"
        dtype_of_denoiser = as_str(b.options.get(f"{_denoiser(b)}.weight_dtype", "FLOAT_32")).upper()
        return (OFF, "frozen weights in train.mixed_precision's dtype") if dtype_of_denoiser in FULL else \
            (UNSUPPORTED, "sdlora stores the denoiser and text encoders alike (model.base_precision)")
    if dtype not in BASE_PRECISION:
        if dtype in ("NFLOAT_4",):
            raise Unmappable("NF4 (bitsandbytes): sdlora's 4-bit base is optimum-quanto int4 (model.base_precision "
                             "int4), a different format: set it yourself")
        if dtype.startswith(("GGUF", "FLOAT_W8A8", "INT_W8A8")):
            raise Unmappable("sdlora stores the base as fp8, int8 or int4 weights (model.base_precision)")
        raise Invalid(f"{dtype!r} is not one of OneTrainer's data types")
    precision = BASE_PRECISION[dtype]
    if part in DENOISERS:
        return MAPPED, b.set("model.base_precision", precision)
    mine = as_str(b.options.get(f"{_denoiser(b)}.weight_dtype", "FLOAT_32")).upper()
    if BASE_PRECISION.get(mine) == precision:
        return MAPPED, "model.base_precision (with the denoiser's)"
    return UNSUPPORTED, "sdlora stores the denoiser and text encoders alike (model.base_precision)"


def finish(b: Builder) -> None:
    """text_encoder.train / train_parts from the encoders' `train` flags."""
    trained = b.state.get("trained_encoders", {})
    if not trained:
        return
    on = [p for p, t in trained.items() if t]
    b.set("text_encoder.train", bool(on))
    if on and (len(on) < len(trained) or "text_encoder_3" in on):  # sdlora leaves SD3's T5 out unless named
        b.set("text_encoder.train_parts", on)
