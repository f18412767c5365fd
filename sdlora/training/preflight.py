"""Checks that run before the model loads (paths, optional packages) and right after it (settings only the
model can judge), so a run that cannot work stops in seconds with one line, and --dry-run stops with it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from sdlora.errors import UserError
from sdlora.model.low_bits import library_missing

OPTIONAL_OPTIMISERS = {"adamw8bit": ("bitsandbytes", "bnb"), "prodigy": ("prodigyopt", "prodigy")}


def before_model(cfg) -> None:
    """Config facts that need the filesystem or the installed packages, but no model."""
    from sdlora.training.periodic_merge import check_config as check_periodic_merge

    check_periodic_merge(cfg)  # the kinds and options periodic merging cannot carry: one line
    needed = OPTIONAL_OPTIMISERS.get(cfg.optim.optimizer)
    if needed and importlib.util.find_spec(needed[0]) is None:
        raise UserError(f"optim.optimizer: {cfg.optim.optimizer} needs {needed[0]}, which is not installed "
                        f"(pip install 'sdlora[{needed[1]}]')")
    if missing := library_missing(cfg.model.base_precision):
        raise UserError(missing)
    if cfg.model.base_precision != "full" and cfg.lora.init in ("compensated", "principal"):
        raise UserError(f"lora.init: {cfg.lora.init} offsets the base weight, which a model.base_precision "
                        f"{cfg.model.base_precision} base cannot hold exactly (allowed with it: zero, orthogonal)")
    if cfg.log.tracker == "wandb" and importlib.util.find_spec("wandb") is None:
        raise UserError("log.tracker: wandb needs wandb, which is not installed (pip install 'sdlora[wandb]', "
                        "or log.tracker: tensorboard)")
    for i, subset in enumerate(cfg.data_subsets()):
        root = Path(subset.path).expanduser()
        key = "data.path" if cfg.data.path is not None else f"data.subsets.{i}.path"
        if not root.is_dir():
            raise UserError(f"{key}: no such folder: {root}" if not root.exists() else f"{key}: {root} is not a folder")
    if cfg.validation.every_steps and cfg.validation.path and not Path(cfg.validation.path).expanduser().is_dir():
        raise UserError(f"validation.path: no such folder: {cfg.validation.path}")
    if cfg.data.mask_dir and not Path(cfg.data.mask_dir).expanduser().is_dir():
        raise UserError(f"data.mask_dir: no such folder: {cfg.data.mask_dir}")
    out = Path(cfg.output.dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"output.dir: {out} exists and is not a folder")
    if cfg.reg.preservation.weight and cfg.reg.preservation.source == "file":
        from sdlora.training.preservation import read_prompts_file

        read_prompts_file(cfg.reg.preservation.prompts_file)  # missing, unreadable or empty: one line, now
    if cfg.sample.prompts_file:
        from sdlora.training.sample_prompts import read_prompts_file as read_sample_prompts

        read_sample_prompts(cfg.sample.prompts_file)  # missing, malformed or empty: one line naming file and line
    for key in ("init_alphas_from", "init_from"):
        if getattr(cfg.lora, key) and not Path(getattr(cfg.lora, key)).expanduser().is_file():
            raise UserError(f"lora.{key}: no such file: {getattr(cfg.lora, key)}")


def against_model(cfg, comps) -> None:
    """Settings whose limits only the loaded model knows (the family's own refusals first: DDPM options on SD3)."""
    comps.family.check_config(cfg)
    steps = comps.noise_scheduler.config.num_train_timesteps
    if cfg.loss.max_timestep is not None and cfg.loss.max_timestep > steps:
        raise UserError(f"loss.max_timestep: {cfg.loss.max_timestep} is beyond the model's {steps} training "
                        f"timesteps (allowed: {cfg.loss.min_timestep + 1} to {steps})")
    if cfg.loss.min_timestep >= steps:
        raise UserError(f"loss.min_timestep: {cfg.loss.min_timestep} must be < the model's {steps} training timesteps")
    # every CLIP encoder skips as many (SD3's T5 gives its last layer, always)
    layers = min(te.config.num_hidden_layers for te in comps.text_encoders.values() if te.config.model_type != "t5")
    if cfg.text_encoder.clip_skip > layers:
        raise UserError(f"text_encoder.clip_skip: {cfg.text_encoder.clip_skip} is more than the text encoder's "
                        f"{layers} layers (allowed: 1 to {layers})")
