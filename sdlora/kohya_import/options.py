"""THE table: every kohya-ss/sd-scripts option (train_network.py's argument list: library/train_util.py,
custom_train_functions.py, sdxl_train_util.py, deepspeed_utils.py, train_network.py) -> an sdlora key, a converter,
or the reason sdlora does not do it.

Options about the data (folders, captions, buckets) are `dataset.py`'s (`DATA` below); `network_args` entries are
`network.py`'s. kohya's defaults that differ from sdlora's are in `KOHYA_DEFAULTS`: an import writes them explicitly
so an option left out means what it meant in kohya.
"""

from __future__ import annotations

import math

from sdlora.kohya_import import network
from sdlora.kohya_import.dataset import DATA, steps_per_epoch
from sdlora.kohya_import.optim import (ITEM_5, legacy_optimizer, learning_rate, optimizer, optimizer_args, scheduler,
                                       scheduler_part, text_encoder_lr, warmup)
from sdlora.kohya_import.rules import (MAPPED, OFF, Builder, Custom, Invalid, NoEffect, To, Unmappable, Unsupported,
                                       as_bool, as_float, as_int, as_path, as_str, is_unset)

# kohya's argparse defaults that differ from sdlora's (options absent from the input take these).
KOHYA_DEFAULTS = {"learning_rate": 2e-6, "max_train_steps": 1600, "optimizer_type": "AdamW", "network_dim": 4,
                  "network_alpha": 1.0, "network_module": "networks.lora", "seed": 0}
LOSS_GAP = "not in sdlora (its loss and noise options: docs/training.md)"


def _flag(key: str, value=True):
    """A store_true option: on -> `key = value`; off -> nothing (sdlora's default is kohya's off)."""
    return Custom(lambda v, b: ((MAPPED, b.set(key, value)) if as_bool(v) else (OFF, "false")), key)


def _nonzero(key: str, read=as_float):
    """A number where kohya (or the GUI) reads 0 as unset."""
    return Custom(lambda v, b: (OFF, "0 is off") if read(v) == 0 else (MAPPED, b.set(key, read(v))), key)


# ------------------------------------------------------------------------------------- length and saving
def _gui_warmup(v, b: Builder):
    """The GUI's `lr_warmup`: a percentage of the training steps, unless its lr_warmup_steps is set."""
    percent = as_float(v)
    if percent == 0:
        return OFF, "0"
    if as_float(b.options.get("lr_warmup_steps") or 0) > 0:
        return OFF, "lr_warmup_steps is set (the GUI uses it)"
    steps = int(percent / 100 * b.get("train.max_steps", KOHYA_DEFAULTS["max_train_steps"]))
    return MAPPED, b.set("optim.warmup_steps", steps) + f" = {steps} ({percent:g}% of train.max_steps)"


def _per_epoch(what: str):
    def convert(v, b: Builder):
        epochs = as_int(v)
        if epochs == 0:
            return OFF, "0"
        per_epoch, how = steps_per_epoch(b)
        if per_epoch is None:
            raise Unmappable(f"sdlora counts in steps and the epoch length is unknown ({how}); set {what} yourself")
        b.set(what, epochs * per_epoch)
        return MAPPED, f"{what} = {epochs * per_epoch} ({epochs} x {how})"
    return Custom(convert)


def _max_epochs(v, b: Builder):
    if as_int(v) == 0:
        return OFF, "0: max_train_steps counts"
    return _per_epoch("train.max_steps")(v, b)


def _gui_epoch(v, b: Builder):
    """The GUI's `epoch`: it computes max_train_steps from it when neither steps nor epochs are given."""
    for other in ("max_train_steps", "max_train_epochs"):
        if other in b.options and as_int(b.options[other] or 0) != 0:
            return OFF, f"{other} is given"
    return _per_epoch("train.max_steps")(v, b)


def _keep_last(v, b: Builder):
    n = as_int(v)
    if n == 0:
        return OFF, "0: keep all"
    every = b.get("checkpoint.every_steps") or 0
    keep = max(1, math.ceil(n / every)) if every else 1
    return MAPPED, b.set("checkpoint.keep_last", keep) + f" = {keep} (the checkpoints of the last {n} steps)"


def _keeping_every_file(rule: Custom) -> Custom:
    """kohya's save_every_n_steps / _epochs: a LoRA file every N steps, every one kept unless save_last_n_steps /
    _epochs limits them (those set checkpoint.keep_last): checkpoint.every_steps, and checkpoint.keep_adapters (each
    checkpoint's adapter kept under output.dir/adapters/) where kohya would keep them all."""
    def convert(v, b: Builder):
        status, detail = rule(v, b)
        limited = any(as_float(b.options.get(k) or 0) for k in ("save_last_n_steps", "save_last_n_epochs"))
        if status == MAPPED and not limited:
            detail += f"; {b.set('checkpoint.keep_adapters', True)} = true (kohya keeps every file it saves)"
        return status, detail
    return Custom(convert, "checkpoint.every_steps, checkpoint.keep_adapters")


def _save_precision(v, b: Builder):
    dtype = {"float": "fp32", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}.get(as_str(v).lower())
    if dtype is None:
        raise Invalid(f"{v!r} is not float, fp16 or bf16")
    return MAPPED, b.set("export.dtype", dtype)


def _save_model_as(v, b: Builder):
    if as_str(v).lower() == "safetensors":
        return OFF, "sdlora writes .safetensors"
    raise Unmappable(f"{v!r}: sdlora writes adapters as .safetensors only")


def _output_dir(v, b: Builder):
    name = as_str(b.options.get("output_name") or "last")  # kohya's file name without output_name: last.safetensors
    b.set("output.dir", f"{as_path(v).rstrip('/')}/{name}")
    return MAPPED, f"output.dir = {v}/{name} (sdlora's run folder: adapter, checkpoints, samples, logs)"


def _sampler(v, b: Builder):
    if as_str(v).lower() in ("ddim", ""):
        return OFF, "sdlora samples with DDIM"
    raise Unmappable(f"{v!r}: sdlora samples with DDIM (eta 0) only")


def _sample_prompts(v, b: Builder):
    if b.options.get("_gui"):  # the GUI holds the prompts' text; kohya gets a file it writes from it
        from sdlora.errors import UserError
        from sdlora.training.sample_prompts import parse_prompt_lines

        try:
            entries = parse_prompt_lines(as_str(v).splitlines(), "sample_prompts")
        except UserError as e:  # e.g. kohya's --ss sampler option: a row, not the end of the import
            raise Unmappable(str(e)) from None
        b.set("sample.entries", [e.as_config() for e in entries])
        return MAPPED, f"sample.entries ({len(entries)} prompts, kohya's --n/--w/--h/--d/--l/--s read)"
    path = as_path(v)
    if not path.lower().endswith(".txt"):
        raise Unmappable(f"{path}: sdlora reads kohya's .txt prompt format (one prompt a line), not .toml/.json")
    return MAPPED, b.set("sample.prompts_file", path)


def _log_with(v, b: Builder):
    tracker = as_str(v).lower()
    if tracker in ("tensorboard", "wandb"):
        return MAPPED, b.set("log.tracker", tracker)
    if tracker == "all":
        return MAPPED, b.set("log.tracker", "tensorboard") + " (sdlora logs to one tracker; metrics.jsonl always)"
    raise Invalid(f"{v!r} is not tensorboard, wandb or all")


def _validation_split(v, b: Builder):
    share = as_float(v)
    if share == 0:
        return OFF, "0"
    images = b.options.get("_train_images")  # without repeats; counted by dataset.py
    if not images:
        raise Unmappable("sdlora holds out a number of images (validation.num_images) and the folders could not be "
                         "counted; set it yourself")
    n = max(1, round(share * images))
    b.set("validation.num_images", n)
    return MAPPED, f"validation.num_images = {n} ({share:g} of {images} images; kohya splits each subset)"


def _mixed_precision(v, b: Builder):
    value = as_str(v).lower()
    if value not in ("no", "fp16", "bf16"):
        raise Invalid(f"{v!r} is not no, fp16 or bf16")
    return MAPPED, b.set("train.mixed_precision", value)


def _max_grad_norm(v, b: Builder):
    norm = as_float(v)
    return MAPPED, b.set("optim.max_grad_norm", norm if norm > 0 else None) + (" (0: no clipping)" if norm <= 0 else "")


LOSS_TYPES = {"l1": "l1", "huber": "pseudo_huber", "smooth_l1": "smooth_l1"}  # kohya's name -> sdlora's loss.type


def _kohya_loss_type(b: Builder) -> str:
    value = b.options.get("loss_type")
    return "l2" if is_unset(value) else as_str(value).lower()


def _loss_type(v, b: Builder):
    kind = _kohya_loss_type(b)
    if kind == "l2":
        return OFF, "l2 = sdlora's loss.type mse"
    if kind not in LOSS_TYPES:
        raise Invalid(f"{v!r} is not l1, l2, huber or smooth_l1")
    detail = b.set("loss.type", LOSS_TYPES[kind]) + f" = {LOSS_TYPES[kind]}"
    if kind != "l1" and is_unset(b.options.get("huber_schedule")):  # kohya's default schedule; sdlora's is constant
        detail += " and " + b.set("loss.huber_schedule", "snr") + " = snr (kohya's default)"
    return MAPPED, detail


def _huber_option(key: str, read):
    """huber_c, huber_schedule, huber_scale: read by kohya only with loss_type huber or smooth_l1."""
    def convert(v, b: Builder):
        if _kohya_loss_type(b) not in ("huber", "smooth_l1"):
            return OFF, "read only with loss_type huber / smooth_l1"
        return MAPPED, b.set(key, read(v))
    return Custom(convert, key)


def _huber_schedule(v) -> str:
    if as_str(v).lower() not in ("constant", "exponential", "snr"):
        raise Invalid(f"{v!r} is not constant, exponential or snr")
    return as_str(v).lower()


def _needs(option: str, key: str, read=as_float, zero_is_off: bool = False):
    """An option kohya reads only when the number `option` is set and not 0 (ip_noise_gamma_random_strength,
    noise_offset_random_strength, adaptive_noise_scale, multires_noise_discount)."""
    def convert(v, b: Builder):
        other = b.options.get(option)
        if is_unset(other) or as_float(other) == 0:
            return OFF, f"read only with {option}"
        value = read(v)
        if value is False or (zero_is_off and value == 0):
            return OFF, f"{value!r} is off"
        return MAPPED, b.set(key, value)
    return Custom(convert, key)


def _v2(v, b: Builder):
    return (MAPPED if as_bool(v) else OFF), "no key: sdlora reads SD 2.x from the model"


SPEED = "speed or memory only: sdlora's own choice (PyTorch SDPA attention, its own placement)"
LAUNCH = "how kohya is launched or logs, not what it trains"
HUB = "Hugging Face uploads: sdlora writes local files only"
OTHER_FAMILY = "an option of kohya's SD3 / Flux / other scripts: not read for SD 1.x, 2.x or SDXL"
META = "adapter metadata text: sdlora writes its own metadata (ss_* and ModelSpec keys)"

OPTIONS: dict[str, object] = {
    # model
    "pretrained_model_name_or_path": To("model.path", as_path, note="a local diffusers folder or single file"),
    "vae": To("model.vae_path", as_path),
    "v2": Custom(_v2),
    "v_parameterization": _flag("model.prediction_type", "v_prediction"),
    "zero_terminal_snr": _flag("model.zero_terminal_snr"),
    "clip_skip": Custom(lambda v, b: (MAPPED, b.set("text_encoder.clip_skip", max(1, as_int(v)))), "text_encoder.clip_skip"),
    "max_token_length": Custom(lambda v, b: (MAPPED, b.set("data.max_token_length", as_int(v) or 75)), "data.max_token_length"),
    "network_weights": To("lora.init_from", as_path),
    "dim_from_weights": Custom(lambda v, b: (OFF, "sdlora's lora.init_from takes every module's rank from the file")),
    "base_weights": Unsupported("sdlora does not merge other LoRAs into the base before training"),
    "base_weights_multiplier": Unsupported("only with base_weights"),
    "tokenizer_cache_dir": NoEffect("sdlora uses the model's (or its bundled) tokenizer offline"),
    "sdxl": NoEffect("no key: sdlora reads SDXL from the model (block weights use SDXL's layout)"),
    # network
    "network_module": Custom(network.module, "lora.type"),
    "network_dim": Custom(network.dim, "lora.rank"),
    "network_alpha": Custom(network.alpha, "lora.alpha"),
    "network_args": Custom(network.args, "see network_args.* rows"),
    "network_dropout": Unsupported("sdlora has no LoRA dropout", off=(0, 0.0, "0")),
    "network_train_unet_only": _flag("text_encoder.train", False),
    "network_train_text_encoder_only": Custom(network.text_encoder_only, "lora.unet_targets"),
    "scale_weight_norms": Unsupported("sdlora has no max-norm regularisation of LoRA weights", off=(0, 0.0, "0")),
    "training_comment": NoEffect(META),
    "no_metadata": NoEffect(META),
    "stop_text_encoder_training": Unsupported("sdlora trains the text encoder for the whole run", off=(0, "0")),
    # optimiser and schedule
    "learning_rate": Custom(learning_rate, "optim.lr, optim.text_encoder_lr"),
    "unet_lr": _nonzero("optim.lr"),
    "text_encoder_lr": Custom(text_encoder_lr, "optim.text_encoder_lr, optim.text_encoder_2_lr"),
    "optimizer_type": Custom(optimizer, "optim.optimizer"),
    "use_8bit_adam": legacy_optimizer("AdamW8bit"),
    "use_lion_optimizer": legacy_optimizer("Lion"),
    "optimizer_args": Custom(optimizer_args, "optim.betas, optim.eps, optim.weight_decay"),
    "optimizer_schedulefree_wrapper": Unsupported(ITEM_5),
    "schedulefree_wrapper_args": Unsupported(ITEM_5),
    "fused_backward_pass": Unsupported("sdlora steps the optimiser after the backward pass"),
    "max_grad_norm": Custom(_max_grad_norm, "optim.max_grad_norm"),
    "lr_scheduler": Custom(scheduler, "optim.scheduler"),
    "lr_scheduler_type": Unsupported("sdlora's schedules are constant, cosine, linear"),
    "lr_scheduler_args": Unsupported("sdlora's schedules take no arguments"),
    "lr_warmup_steps": Custom(warmup, "optim.warmup_steps"),
    "lr_scheduler_num_cycles": scheduler_part(as_int, 1, ("cosine_with_restarts", "cosine_with_min_lr")),
    "lr_scheduler_power": scheduler_part(as_float, 1.0, ("polynomial",)),
    "lr_decay_steps": Unsupported("only for kohya's warmup_stable_decay schedule", off=(0, "0")),
    "lr_scheduler_timescale": Unsupported("only for kohya's inverse_sqrt schedule"),
    "lr_scheduler_min_lr_ratio": Unsupported("sdlora's schedules end at 0"),
    # length, batches, precision
    "max_train_steps": To("train.max_steps", as_int, off=(0, "0")),
    "(GUI) lr_warmup": Custom(_gui_warmup, "optim.warmup_steps"),
    "max_train_epochs": Custom(_max_epochs, "train.max_steps"),
    "epoch": Custom(_gui_epoch, "train.max_steps"),
    "train_batch_size": Custom(lambda v, b: (MAPPED, b.set("train.batch_size", as_int(v))), "train.batch_size"),
    "gradient_accumulation_steps": To("train.gradient_accumulation_steps", as_int),
    "seed": Custom(lambda v, b: (MAPPED, b.set("train.seed", as_int(v))) if as_int(v) else
                   (MAPPED, b.set("train.seed", 0) + " = 0 (kohya draws a random seed when unset)"), "train.seed"),
    "mixed_precision": Custom(_mixed_precision, "train.mixed_precision"),
    "full_fp16": Unsupported("sdlora keeps LoRA weights in fp32 under autocast"),
    "full_bf16": Unsupported("sdlora keeps LoRA weights in fp32 under autocast"),
    "fp8_base": Unsupported("sdlora stores frozen weights in train.mixed_precision's dtype (no fp8)"),
    "fp8_base_unet": Unsupported("sdlora stores frozen weights in train.mixed_precision's dtype (no fp8)"),
    "no_half_vae": Unsupported("sdlora keeps the VAE in train.mixed_precision's dtype (bf16 avoids SDXL's fp16 VAE "
                               "overflow; or train.mixed_precision: no)"),
    "gradient_checkpointing": _flag("train.gradient_checkpointing"),
    "torch_compile": _flag("train.compile"),
    "cache_text_encoder_outputs": _flag("data.cache_text_encoder_outputs"),
    "cache_text_encoder_outputs_to_disk": Unsupported("sdlora caches text-encoder outputs in memory"),
    # loss and noise
    "noise_offset": _nonzero("loss.noise_offset"),
    "min_snr_gamma": _nonzero("loss.min_snr_gamma"),
    "min_timestep": _nonzero("loss.min_timestep", as_int),
    "max_timestep": _nonzero("loss.max_timestep", as_int),
    "loss_type": Custom(_loss_type, "loss.type"),
    "huber_schedule": _huber_option("loss.huber_schedule", _huber_schedule),
    "huber_c": _huber_option("loss.huber_delta", as_float),
    "huber_scale": _huber_option("loss.huber_scale", as_float),
    "noise_offset_random_strength": _needs("noise_offset", "loss.noise_offset_random_strength", as_bool),
    "adaptive_noise_scale": _needs("noise_offset", "loss.adaptive_noise_scale", zero_is_off=True),
    "multires_noise_iterations": _nonzero("loss.multires_noise_iterations", as_int),
    "multires_noise_discount": _needs("multires_noise_iterations", "loss.multires_noise_discount"),
    "ip_noise_gamma": _nonzero("loss.ip_noise_gamma"),
    "ip_noise_gamma_random_strength": _needs("ip_noise_gamma", "loss.ip_noise_random_strength", as_bool),
    "perlin_noise": Unsupported(LOSS_GAP, off=(0, "0")),
    "debiased_estimation_loss": _flag("loss.debiased_estimation"),
    "scale_v_pred_loss_like_noise_pred": Unsupported(LOSS_GAP),
    "v_pred_like_loss": Unsupported(LOSS_GAP, off=(0, 0.0, "0")),
    "weighted_captions": Unsupported("sdlora reads (word:1.2) as plain text, no prompt weighting"),
    # saving, sampling, logging
    "output_dir": Custom(_output_dir, "output.dir"),
    "output_name": To("output.name", as_str),
    "save_model_as": Custom(_save_model_as),
    "use_safetensors": NoEffect("sdlora writes .safetensors"),
    "save_precision": Custom(_save_precision, "export.dtype"),
    "save_every_n_steps": _keeping_every_file(_nonzero("checkpoint.every_steps", as_int)),
    "save_every_n_epochs": _keeping_every_file(_per_epoch("checkpoint.every_steps")),
    "save_n_epoch_ratio": Unsupported("set checkpoint.every_steps"),
    "save_last_n_steps": Custom(_keep_last, "checkpoint.keep_last"),
    "save_last_n_steps_state": Custom(_keep_last, "checkpoint.keep_last"),
    "save_last_n_epochs": _nonzero("checkpoint.keep_last", as_int),
    "save_last_n_epochs_state": _nonzero("checkpoint.keep_last", as_int),
    "save_state": NoEffect("every sdlora checkpoint is a resumable state (checkpoint.every_steps)"),
    "save_state_on_train_end": NoEffect("sdlora always saves a resumable checkpoint at the end"),
    "resume": Unsupported("sdlora resumes its own checkpoints only (sdlora train --resume)"),
    "skip_until_initial_step": Unsupported("sdlora resumes exactly from its checkpoints"),
    "initial_epoch": Unsupported("sdlora resumes exactly from its checkpoints"),
    "initial_step": Unsupported("sdlora resumes exactly from its checkpoints"),
    "sample_every_n_steps": _nonzero("sample.every_steps", as_int),
    "sample_every_n_epochs": _per_epoch("sample.every_steps"),
    "sample_at_first": Unsupported("sdlora samples every sample.every_steps and at the end, not before step 1"),
    "sample_prompts": Custom(_sample_prompts, "sample.prompts_file / sample.entries"),
    "sample_sampler": Custom(_sampler),
    "log_with": Custom(_log_with, "log.tracker"),
    "validation_split": Custom(_validation_split, "validation.num_images"),
    "validation_seed": To("validation.seed", as_int),
    "validate_every_n_steps": _nonzero("validation.every_steps", as_int),
    "validate_every_n_epochs": _per_epoch("validation.every_steps"),
    "max_validation_steps": Unsupported("sdlora validates every held-out image"),
    "max_data_loader_n_workers": To("data.num_workers", as_int),
}
for _name in ("xformers", "sdpa", "mem_eff_attn", "lowram", "highvram", "vae_batch_size", "text_encoder_batch_size",
              "persistent_data_loader_workers", "blocks_to_swap", "cpu_offload_checkpointing", "dynamo_backend",
              "disable_mmap_load_safetensors", "skip_cache_check", "cache_info", "mem_eff_save"):
    OPTIONS[_name] = NoEffect(SPEED)
for _name in ("logging_dir", "log_prefix", "log_tracker_name", "log_tracker_config", "log_config", "wandb_run_name",
              "wandb_api_key", "config_file", "output_config", "debug_dataset", "ddp_timeout",
              "ddp_gradient_as_bucket_view", "ddp_static_graph", "deepspeed", "zero_stage", "offload_optimizer_device",
              "offload_optimizer_nvme_path", "offload_param_device", "offload_param_nvme_path", "zero3_init_flag",
              "zero3_save_16bit_model", "fp16_master_weights_and_gradients", "console_log_level", "console_log_file",
              "console_log_simple"):
    OPTIONS[_name] = NoEffect(LAUNCH)
for _name in ("huggingface_repo_id", "huggingface_repo_type", "huggingface_path_in_repo", "huggingface_token",
              "huggingface_repo_visibility", "save_state_to_huggingface", "resume_from_huggingface", "async_upload"):
    OPTIONS[_name] = NoEffect(HUB)
for _name in ("metadata_title", "metadata_author", "metadata_description", "metadata_license", "metadata_tags",
              "metadata_reso", "metadata_arch", "metadata_is_negative_embedding", "metadata_merged_from",
              "metadata_preprocessor", "metadata_thumbnail", "metadata_trigger_phrase", "metadata_usage_hint"):
    OPTIONS[_name] = NoEffect(META)
for _name in ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "timestep_sampling", "discrete_flow_shift",
              "model_prediction_type", "guidance_scale", "apply_t5_attn_mask", "t5xxl", "t5xxl_max_token_length",
              "clip_l", "clip_g", "ae", "split_mode", "sigmoid_scale", "fp8_scaled"):
    OPTIONS[_name] = NoEffect(OTHER_FAMILY)
for _name in DATA:
    OPTIONS.setdefault(_name, "data")  # rows come from dataset.py (per subset, with kohya's layering)
