"""THE table: every option of OneTrainer's saved training config (modules/util/config/TrainConfig.py
TrainConfig.default_values, config version 11) -> an sdlora key, a converter, or the reason sdlora does not do it.

The per-part objects (`unet.*`, `text_encoder.*`, ...) are parts.py's, the optimiser object (`optimizer.*`)
optim.py's, `concepts` and `samples` data.py's; `rule(name)` finds the rule of any dotted option.
`ONETRAINER_DEFAULTS`: OneTrainer's defaults that differ from sdlora's, written explicitly when the file leaves them
out (the UI always saves them; a hand-written file may not).
"""

from __future__ import annotations

from sdlora.kohya_import.rules import (MAPPED, NO_EFFECT, OFF, UNSUPPORTED, Builder, Custom, Invalid, NoEffect, To, Unmappable,
                                       Unsupported, as_bool, as_float, as_int, as_str)
from sdlora.onetrainer_import import loss, optim, parts
from sdlora.onetrainer_import.data import resolutions, steps_per_epoch

ONETRAINER_DEFAULTS = {"training_method": "FINE_TUNE", "model_type": "STABLE_DIFFUSION_15", "learning_rate": 3e-6,
                       "learning_rate_warmup_steps": 200.0, "epochs": 100, "lora_rank": 16, "lora_alpha": 1.0,
                       "train_dtype": "FLOAT_16", "ema_decay": 0.999,
                       "optimizer.optimizer": "ADAMW"}  # with its weight decay 0.01 (torch's AdamW default)
LAUNCH = "how OneTrainer runs, logs or caches, not what it trains"
SPEED = "speed or memory only: sdlora's own choice"
W = "OneTrainer"


def _unsupported(why: str, off=()):
    return Unsupported(why, off=off, who=W)


def _flag(key: str, value=True):
    return Custom(lambda v, b: (MAPPED, b.set(key, value)) if as_bool(v) else (OFF, "false"), key)


def _nonzero(key: str, read=as_float):
    return Custom(lambda v, b: (OFF, "0 is off") if read(v) == 0 else (MAPPED, b.set(key, read(v))), key)


CONFIG_VERSION = 11  # TrainConfig's config_version this table follows


def _version(v, b: Builder):
    if as_int(v) != CONFIG_VERSION:
        b.notes.append(f"config version {v}, the table follows version {CONFIG_VERSION}: OneTrainer migrates a file "
                       "when it loads it; options renamed since show as unknown (open and save it in OneTrainer first)")
    return NO_EFFECT, f"OneTrainer's config format version (this table: {CONFIG_VERSION})"


# ------------------------------------------------------------------------------------- length and saving
def _steps(n: int, unit_option: str, what: str, b: Builder) -> tuple[int | None, str]:
    """N in the unit `unit_option` names, as optimiser steps (OneTrainer counts a step per batch)."""
    unit = as_str(b.options.get(unit_option, "NEVER")).upper()
    accum = b.get("train.gradient_accumulation_steps", 1)
    if unit == "NEVER" or n == 0:
        return None, "never"
    if unit == "ALWAYS":
        return 1, "every step"
    if unit == "STEP":
        return max(1, n // accum), f"{n} steps" + (f" / accumulation {accum}" if accum > 1 else "")
    if unit == "EPOCH":
        per_epoch, how = steps_per_epoch(b)
        if per_epoch is None:
            raise Unmappable(f"sdlora counts in steps and the epoch length is unknown ({how}); set {what} yourself")
        return n * per_epoch, f"{n} x {how}"
    if unit in ("SECOND", "MINUTE", "HOUR"):
        raise Unmappable(f"every {n} {unit.lower()}(s): sdlora counts in steps; set {what} yourself")
    raise Invalid(f"{unit_option} {unit!r} is not one of OneTrainer's time units")


def _every(what: str, unit_option: str):
    def convert(v, b: Builder):
        steps, how = _steps(as_int(v), unit_option, what, b)
        if steps is None:
            return OFF, "never"
        if b.get(what) is not None and b.get(what) <= steps:  # checkpoints: backups and saves, the more frequent
            return MAPPED, f"{what} already {b.get(what)} (more often)"
        b.set(what, steps)
        return MAPPED, f"{what} = {steps} ({how})"
    return Custom(convert, what)


def _unit(v, b: Builder):
    return MAPPED, "read with the option it qualifies"


def _epochs(v, b: Builder):
    per_epoch, how = steps_per_epoch(b)
    if per_epoch is None:
        raise Unmappable(f"sdlora counts in steps and the epoch length is unknown ({how}); set train.max_steps")
    b.set("train.max_steps", as_int(v) * per_epoch)
    return MAPPED, f"train.max_steps = {as_int(v) * per_epoch} ({v} x {how})"


def _workspace(v, b: Builder):
    return MAPPED, b.set("output.dir", as_str(v).rstrip("/\\")) + " (sdlora's run folder: adapter, checkpoints, samples, logs)"


def _destination(v, b: Builder):
    stem = as_str(v).replace("\\", "/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    if stem:
        b.set("output.name", stem)
    return MAPPED, "output.name = " + stem + " (sdlora writes <output.dir>/adapter.safetensors: copy it there)"


def _format(v, b: Builder):
    if as_str(v).upper() in ("SAFETENSORS", "KOHYA_LORA", "DIFFUSERS_LORA", "LEGACY_LORA", "COMFY_LORA"):
        return OFF, "sdlora writes .safetensors (docs/formats.md: its layouts)"
    raise Unmappable(f"{v!r}: sdlora writes adapter .safetensors only")


def _dtype(key: str, allowed: dict):
    def convert(v, b: Builder):
        name = as_str(v).upper()
        if name not in allowed:
            raise Invalid(f"{v!r} is not one of {', '.join(allowed)}")
        return MAPPED, b.set(key, allowed[name])
    return Custom(convert, key)


def _resolution(v, b: Builder):
    return MAPPED, b.set("data.resolution", resolutions(v))


def _tensorboard(v, b: Builder):
    return MAPPED, b.set("log.tracker", "tensorboard" if as_bool(v) else "none")


def _rolling(v, b: Builder):
    if not as_bool(v):
        return OFF, "OneTrainer keeps every backup; sdlora keeps checkpoint.keep_last (default 3)"
    return MAPPED, b.set("checkpoint.keep_last", max(1, as_int(b.options.get("rolling_backup_count", 3))))


def _validation(v, b: Builder):
    if not as_bool(v):
        return OFF, "false"
    if b.get("validation.path") is None:
        raise Unmappable("no enabled VALIDATION concept: sdlora validates a folder (validation.path) or held-out "
                         "images (validation.num_images)")
    steps, how = _steps(as_int(b.options.get("validate_after", 1)), "validate_after_unit", "validation.every_steps", b)
    b.set("validation.every_steps", steps or 0)
    return MAPPED, f"validation.every_steps = {steps} ({how})"


# --------------------------------------------------------------------------------------------- the rest
def _learning_rate(v, b: Builder):
    keys = []
    if b.options.get(f"{parts._denoiser(b)}.learning_rate") is None:
        keys.append(b.set("optim.lr", as_float(v)))
    if b.options.get("text_encoder.learning_rate") is None:
        keys.append(b.set("optim.text_encoder_lr", as_float(v)))
    return MAPPED, ", ".join(keys) or "overridden by the parts' learning rates"


def _ema(v, b: Builder):
    mode = as_str(v).upper()
    if mode == "OFF":
        return OFF, "OFF"
    if mode not in ("GPU", "CPU"):
        raise Invalid(f"{v!r} is not OFF, GPU or CPU")
    b.set("train.ema.enabled", True)
    return MAPPED, "train.ema.enabled, " + b.set("train.ema.device", "cpu" if mode == "CPU" else "same")


def _ema_decay(v, b: Builder):
    """OneTrainer updates the average every `ema_update_step_interval` steps; sdlora every step: the per-step decay
    decay ** (1 / interval) averages over the same number of steps."""
    if as_str(b.options.get("ema", "OFF")).upper() == "OFF":
        return OFF, "ema is OFF"
    every = max(1, as_int(b.options.get("ema_update_step_interval", 1)))
    decay = as_float(v) ** (1 / every)
    b.set("train.ema.decay", decay)
    return MAPPED, f"train.ema.decay = {decay:.6g}" + (f" (per step: {v} every {every} steps)" if every > 1 else "")


def _peft(v, b: Builder):
    name = as_str(v).upper()
    decompose = as_bool(b.options.get("lora_decompose", False))
    if name == "LORA":
        return MAPPED, b.set("lora.type", "dora" if decompose else "lora") + (" = dora (lora_decompose)" if decompose else "")
    if name in ("LOHA", "LOKR"):
        if decompose:
            raise Unmappable(f"{name} with weight decomposition: sdlora's DoRA is lora.type dora (plain LoRA)")
        return MAPPED, b.set("lora.type", name.lower())
    raise Unmappable(f"{name}: sdlora's adapters are LORA (and DoRA), LOHA, LOKR")


def _decompose(v, b: Builder):
    if not as_bool(v):
        return OFF, "false"
    if as_str(b.options.get("peft_type", "LORA")).upper() == "LORA":
        return MAPPED, b.set("lora.type", "dora") + " = dora"
    return MAPPED, "read with peft_type (see its row)"


def _lora_field(key: str, read, kinds=("LORA", "LOHA")):
    def convert(v, b: Builder):
        if as_str(b.options.get("peft_type", "LORA")).upper() not in kinds:
            return OFF, f"not read for peft_type {b.options.get('peft_type')}"
        return MAPPED, b.set(key, read(v))
    return Custom(convert, key)


def _only_with(option: str, on_values, why: str, off=()):
    """Read only when `option` is one of `on_values`: then off at `off` values, else NOT SUPPORTED with `why`."""
    def convert(v, b: Builder):
        if as_str(b.options.get(option, "")).upper() not in on_values and b.options.get(option) not in on_values:
            return OFF, f"only with {option} {'/'.join(map(str, on_values))}"
        return (OFF, f"{v!r}: off") if v in off or v is False else (UNSUPPORTED, why)
    return Custom(convert)


def _layer_preset(v, b: Builder):
    if as_str(b.options.get("layer_filter", "")).strip() and as_str(v) not in ("full", "attn-only", "attn-mlp"):
        return OFF, "a custom layer_filter (see its row)"
    name = as_str(v)
    if name == "attn-only":
        return OFF, "attention projections: sdlora's default lora.unet_targets"
    ff = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
    if name == "attn-mlp":
        b.set("lora.unet_targets", ff)
        return MAPPED, "lora.unet_targets (attention and feed-forward; proj_in/proj_out only with lora.conv)"
    if name == "full":
        b.set("lora.unet_targets", ff + ["proj_in", "proj_out", "time_emb_proj"])
        b.set("lora.conv", True)
        return MAPPED, "lora.unet_targets + lora.conv (every Linear and Conv2d but conv_in/conv_out)"
    raise Unmappable(f"{name!r}: sdlora knows OneTrainer's presets full, attn-mlp, attn-only")


def _layer_filter(v, b: Builder):
    if not as_str(v).strip():
        return OFF, "empty: layer_filter_preset"
    raise Unmappable("OneTrainer matches module names by substring; set lora.unet_targets (name endings or re:) "
                     "yourself")


def _file_list(option: str):
    """concept_file_name / sample_definition_file_name: convert.py decides (read from the command line, inline, or
    not read) before the table runs and leaves the row's (status, detail) in b.state."""
    return Custom(lambda v, b: b.state.get(option, (OFF, "not read")))


def _layer_skip(v, b: Builder):
    return MAPPED, b.set("text_encoder.clip_skip", as_int(v) + 1) + f" = {as_int(v) + 1} (layer_skip + 1)"


def _second_skip(v, b: Builder):
    if "text_encoder_2" not in b.state.get("parts", ()):
        return OFF, "no second text encoder"
    if as_int(v) == as_int(b.options.get("text_encoder_layer_skip", 0)):
        return MAPPED, "the same as text_encoder_layer_skip (text_encoder.clip_skip)"
    return UNSUPPORTED, "sdlora skips the same number of layers in every text encoder (text_encoder.clip_skip)"


OPTIONS: dict[str, object] = {
    "__version": Custom(_version),
    "secrets": NoEffect("OneTrainer's tokens and keys: not read, not written"),
    # model
    "training_method": Custom(parts.training_method),
    "model_type": Custom(parts.model_type),
    "base_model_name": To("model.path", as_str, note="a local diffusers folder or single file (not a Hub name)"),
    "output_dtype": _dtype("export.dtype", {"FLOAT_32": "fp32", "FLOAT_16": "fp16", "BFLOAT_16": "bf16"}),
    "output_model_format": Custom(_format),
    "output_model_destination": Custom(_destination, "output.name"),
    "workspace_dir": Custom(_workspace, "output.dir"),
    "force_circular_padding": _unsupported("sdlora pads convolutions with zeros"),
    "compile": _flag("train.compile"),
    "text_encoder_layer_skip": Custom(_layer_skip, "text_encoder.clip_skip"),
    "text_encoder_2_layer_skip": Custom(_second_skip),
    "text_encoder_3_layer_skip": _unsupported("sdlora skips no T5 layers", off=(0,)),
    "text_encoder_4_layer_skip": NoEffect("no family sdlora trains has a fourth text encoder"),
    "text_encoder_sequence_length": NoEffect("read by OneTrainer for Flux's T5 only"),
    "text_encoder_2_sequence_length": NoEffect("read by OneTrainer for Flux's T5 only"),
    # data
    "concept_file_name": _file_list("concept_file_name"),
    "sample_definition_file_name": _file_list("sample_definition_file_name"),
    "aspect_ratio_bucketing": To("data.bucketing", as_bool),
    "resolution": Custom(_resolution, "data.resolution"),
    "masked_training": Custom(lambda v, b: (MAPPED, b.set("data.masked_loss", True) + " (sdlora reads a same-name "
                                            "mask in data.mask_dir or the alpha channel, not OneTrainer's "
                                            "-masklabel.png files: set data.mask_dir)") if as_bool(v) else (OFF, "false")),
    "unmasked_probability": _only_with("masked_training", (True,), "sdlora always applies the mask"),
    "unmasked_weight": _only_with("masked_training", (True,), "sdlora weights outside the mask by the mask's value"),
    "normalize_masked_area_loss": _unsupported("sdlora averages the masked loss over every latent cell"),
    "masked_prior_preservation_weight": _unsupported("sdlora has no masked prior preservation", off=(0, 0.0)),
    "custom_conditioning_image": _unsupported("sdlora has no conditioning images"),
    # training
    "learning_rate": Custom(_learning_rate, "optim.lr, optim.text_encoder_lr"),
    "learning_rate_scheduler": Custom(optim.scheduler, "optim.scheduler"),
    "custom_learning_rate_scheduler": Custom(optim.custom_scheduler),
    "scheduler_params": Custom(optim.custom_scheduler),
    "learning_rate_warmup_steps": Custom(optim.warmup, "optim.warmup_steps"),
    "learning_rate_cycles": Custom(optim.cycles),
    "learning_rate_min_factor": Custom(optim.min_factor),
    "learning_rate_scaler": Custom(optim.learning_rate_scaler),
    "clip_grad_norm": Custom(optim.clip_grad_norm, "optim.max_grad_norm"),
    "epochs": Custom(_epochs, "train.max_steps"),
    "batch_size": To("train.batch_size", as_int),
    "gradient_accumulation_steps": To("train.gradient_accumulation_steps", as_int),
    "train_dtype": _dtype("train.mixed_precision", {"FLOAT_16": "fp16", "BFLOAT_16": "bf16", "FLOAT_32": "no",
                                                    "TFLOAT_32": "no"}),
    "ema": Custom(_ema, "train.ema.enabled, train.ema.device"),
    "ema_decay": Custom(_ema_decay, "train.ema.decay"),
    "ema_update_step_interval": Custom(lambda v, b: (MAPPED, "folded into train.ema.decay (see its row)")
                                      if as_str(b.options.get("ema", "OFF")).upper() != "OFF" else (OFF, "ema is OFF")),
    "only_cache": _unsupported("sdlora trains; `sdlora train` caches latents as it goes"),
    "dropout_probability": _unsupported("sdlora has no LoRA dropout", off=(0, 0.0)),
    # loss and noise
    "mse_strength": Custom(loss.loss, "loss.type"),
    "mae_strength": loss.loss_part("mae"),
    "log_cosh_strength": loss.loss_part("log_cosh"),
    "huber_strength": loss.loss_part("huber"),
    "huber_delta": Custom(loss.huber_delta, "loss.huber_delta"),
    "vb_loss_strength": NoEffect("only for models that learn their variance (none sdlora trains)"),
    "loss_weight_fn": Custom(loss.loss_weight, "loss.min_snr_gamma"),
    "loss_weight_strength": Custom(lambda v, b: (OFF, "only with a loss_weight_fn") if as_str(
        b.options.get("loss_weight_fn", "CONSTANT")).upper() == "CONSTANT" else (MAPPED, "read with loss_weight_fn (see its row)")),
    "loss_scaler": _unsupported("sdlora does not scale the loss by batch size or accumulation", off=("NONE",)),
    "offset_noise_weight": _nonzero("loss.noise_offset"),
    "generalized_offset_noise": _unsupported("sdlora's noise offset is the original one"),
    "perturbation_noise_weight": _nonzero("loss.ip_noise_gamma"),
    "rescale_noise_scheduler_to_zero_terminal_snr": _flag("model.zero_terminal_snr"),
    "force_v_prediction": _flag("model.prediction_type", "v_prediction"),
    "force_epsilon_prediction": _flag("model.prediction_type", "epsilon"),
    "min_noising_strength": loss.noising("loss.min_timestep", "loss.flow.min_sigma", 1000, 0.0),
    "max_noising_strength": loss.noising("loss.max_timestep", "loss.flow.max_sigma", 1000, 1.0),
    "timestep_distribution": Custom(loss.distribution, "loss.flow.timestep_sampling"),
    "noising_weight": loss.noising_param("noising_weight"),
    "noising_bias": loss.noising_param("noising_bias"),
    "timestep_shift": Custom(loss.shift, "loss.flow.shift"),
    "dynamic_timestep_shifting": _unsupported("sdlora's shift is one number (loss.flow.shift)"),
    # adapter
    "peft_type": Custom(_peft, "lora.type"),
    "lora_model_name": Custom(lambda v, b: (MAPPED, b.set("lora.init_from", as_str(v))) if as_str(v or "") else
                              (OFF, "empty"), "lora.init_from"),
    "lora_rank": _lora_field("lora.rank", as_int),
    "lora_alpha": _lora_field("lora.alpha", as_float, ("LORA", "LOHA", "LOKR")),
    "lora_decompose": Custom(_decompose, "lora.type"),
    "lora_decompose_norm_epsilon": NoEffect("a numerical detail of DoRA's norm"),
    "lora_decompose_output_axis": _unsupported("sdlora's DoRA normalises per output feature (the paper's)"),
    "lora_weight_dtype": _unsupported("sdlora keeps adapter weights in fp32", off=("FLOAT_32",)),
    "bundle_additional_embeddings": NoEffect("only with additional_embeddings"),
    "lokr_dim": _lora_field("lora.rank", as_int, ("LOKR",)),
    "lokr_decompose_factor": _lora_field("lora.lokr_factor", as_int, ("LOKR",)),
    "layer_filter_preset": Custom(_layer_preset, "lora.unet_targets, lora.conv"),
    "layer_filter": Custom(_layer_filter),
    "layer_filter_regex": NoEffect("read with layer_filter"),
    "embedding_learning_rate": NoEffect("only with additional_embeddings"),
    "preserve_embedding_norm": NoEffect("only with additional_embeddings"),
    "embedding_weight_dtype": NoEffect("only with additional_embeddings"),
    "additional_embeddings": _unsupported("sdlora trains no textual-inversion embeddings"),
    "optimizer_defaults": NoEffect("the UI's remembered settings of each optimiser (the chosen one is optimizer.*)"),
    # saving, sampling, validation, logging
    "sample_after": _every("sample.every_steps", "sample_after_unit"),
    "sample_after_unit": Custom(_unit),
    "sample_skip_first": _unsupported("sdlora samples from the first sample.every_steps", off=(0,)),
    "sample_image_format": NoEffect("sdlora writes PNG samples (with their settings in the text chunk)"),
    "samples_to_tensorboard": NoEffect(LAUNCH),
    "non_ema_sampling": NoEffect("sdlora samples with the trained weights"),
    "backup_after": _every("checkpoint.every_steps", "backup_after_unit"),
    "backup_after_unit": Custom(_unit),
    "save_every": _every("checkpoint.every_steps", "save_every_unit"),
    "save_every_unit": Custom(_unit),
    "rolling_backup": Custom(_rolling, "checkpoint.keep_last"),
    "rolling_backup_count": Custom(lambda v, b: (MAPPED, "read with rolling_backup (see its row)")
                                   if b.options.get("rolling_backup") is True else (OFF, "only with rolling_backup")),
    "save_skip_first": _unsupported("sdlora saves from the first checkpoint.every_steps", off=(0,)),
    "continue_last_backup": _unsupported("sdlora resumes with `sdlora train --resume`"),
    "validation": Custom(_validation, "validation.every_steps"),
    "validate_after": Custom(_unit),
    "validate_after_unit": Custom(_unit),
    "tensorboard": Custom(_tensorboard, "log.tracker"),
}
for _name in ("debug_mode", "debug_dir", "cache_dir", "huggingface_cache_dir", "offline_mode", "tensorboard_expose",
              "tensorboard_always_on", "tensorboard_port", "prevent_overwrites", "include_train_config", "multi_gpu",
              "device_indexes", "gradient_reduce_precision", "fused_gradient_reduce", "async_gradient_reduce",
              "async_gradient_reduce_buffer", "train_device", "temp_device", "latent_caching",
              "clear_cache_before_training", "save_filename_prefix", "backup_before_save", "sample_video_format",
              "sample_audio_format", "dataloader_threads"):
    OPTIONS[_name] = NoEffect(LAUNCH)
for _name in ("async_offloading", "fallback_train_dtype", "enable_autocast_cache", "attention_mechanism"):
    OPTIONS[_name] = NoEffect(SPEED)
for _name in ("frames",):
    OPTIONS[_name] = NoEffect("video models only")
for _name in ("oft_block_size", "oft_block_share", "oft_scaled"):
    OPTIONS[_name] = NoEffect("only for peft_type OFT_2 (see its row)")
for _name in ("lokr_decompose_both", "lokr_use_tucker", "lokr_weight_decompose", "lokr_full_matrix"):
    OPTIONS[_name] = _only_with("peft_type", ("LOKR",), "sdlora's LoKr factors w1 fully, w2 low-rank (LyCORIS' "
                                "default)", off=(False,))
for _name in ("lokr_dora_on_output", "lokr_vec_trick"):
    OPTIONS[_name] = NoEffect("a detail of OneTrainer's LoKr (read only with weight decomposition / speed)")


def rule(name: str):
    """The rule of a dotted option name, or None (an unknown option)."""
    if name in OPTIONS:
        return OPTIONS[name]
    head, _, field = name.partition(".")
    if head in parts.ALL_PARTS and field:
        return Custom(parts.part_field(head, field))
    if head == "optimizer" and field:
        return Custom(optim.optimizer) if field == "optimizer" else Custom(optim.field(field))
    if head == "cloud":
        return NoEffect("OneTrainer's cloud training: sdlora runs where it is started")
    if head == "quantization":
        if field == "svd_dtype":
            return _unsupported("sdlora has no SVD-quantised base", off=("NONE",))
        return NoEffect("read with quantization.svd_dtype or the base's weight_dtype")
    if head == "embedding":
        return NoEffect("only for training_method EMBEDDING")
    return None
