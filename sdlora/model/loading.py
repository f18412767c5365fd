"""Base model parts: loading them (diffusers folder or single file), and the tiny model factory.

The tiny model has SD 1.x's (or SD 2.x's) block structure with random weights and a self-made
byte-level CLIP tokenizer, so tests and the demo run offline in seconds.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from sdlora.errors import LOAD_ERRORS, UserError  # noqa: F401 (LOAD_ERRORS re-exported)
from sdlora.model.components import Components
from sdlora.model.families import FAMILIES, SUPPORTED, ModelFamily
from sdlora.model.schedule import set_noise_schedule



def _quiet_loaders():
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (path / "model_index.json").is_file()


def load_components(model_path: str, *, vae_path: str | None = None, config_dir: str | None = None,
                    allow_pickle: bool = False, prediction_type: str | None = None,
                    zero_terminal_snr: bool | None = None, text_encoders_path: str | None = None) -> Components:
    """Load the family's parts (model/parts.py: denoiser, text encoders, tokenizers, VAE) and its training noise
    scheduler, offline, in fp32. `text_encoders_path` (model.text_encoders_path): a diffusers SD3 / SD3.5 folder
    giving the text encoders an SD3 single file lacks (model/sd3_single_file.py); refused with a folder model.path.

    `prediction_type` (model.prediction_type) and `zero_terminal_snr` (model.zero_terminal_snr) override what the
    model's configs or metadata say (None: keep it)."""
    _quiet_loaders()
    path = Path(os.path.expanduser(model_path))
    if not path.exists():
        raise UserError(f"model.path: no such file or folder: {path}")
    if path.is_dir():
        if text_encoders_path is not None:
            raise UserError(f"model.text_encoders_path: for an SD3 / SD3.5 single-file model.path only; {path} is a "
                            "folder, whose text encoders are its own")
        comps = _load_diffusers_folder(path)
    else:
        from sdlora.model.single_file import load_single_file

        comps = load_single_file(path, config_dir=config_dir, allow_pickle=allow_pickle,
                                 text_encoders_path=text_encoders_path)
    if vae_path:
        comps.vae = load_vae(vae_path, config_dir=config_dir, allow_pickle=allow_pickle, base_config=comps.vae.config)
        latent = comps.denoiser.config.in_channels
        if comps.vae.config.latent_channels != latent:
            raise UserError(f"model.vae_path: {vae_path} makes {comps.vae.config.latent_channels}-channel latents; "
                            f"the model's {comps.family.denoiser.name} takes {latent} (an SD VAE is needed)")
    require_finite_weights({**comps.adaptable(), **({} if vae_path else {"vae": comps.vae})}, path)
    if vae_path:
        require_finite_weights({"vae": comps.vae}, vae_path)
    set_noise_schedule(comps, prediction_type, zero_terminal_snr)
    return comps


def require_finite_weights(parts: dict, source) -> None:
    """A `UserError` naming `source` and the first weight holding NaN or inf: a broken checkpoint (or one someone
    else made) would otherwise fail later as a LinAlgError in an SVD or as non-finite training losses. One pass over
    the weights (a float32 sum per tensor, confirmed elementwise only where it is not finite)."""
    import torch

    with torch.no_grad():
        for part, model in parts.items():
            for name, p in model.named_parameters():
                if p.is_floating_point() and not bool(torch.isfinite(p.sum(dtype=torch.float32))) \
                        and not bool(torch.isfinite(p).all()):
                    raise UserError(f"{source}: {part}.{name} holds non-finite values (NaN/inf); the model file is "
                                    "broken")


def _load_diffusers_folder(path: Path) -> Components:
    if not is_diffusers_folder(path):
        raise UserError(f"model.path: {path} is not a diffusers model folder (no model_index.json)")
    return load_parts(path, check_family(path))


def load_parts(path: Path, family: ModelFamily) -> Components:
    """Every part of `family`'s parts table from a diffusers folder (each from its subfolder with its class, each text
    encoder's tokenizer, the scheduler as `family.scheduler_class`), offline, in fp32; a UserError naming a missing
    subfolder or a part that does not load."""
    import diffusers

    # an optional part (SD3's T5) the folder lacks, model and tokenizer both, is left out
    parts = [p for p in family.parts if not (p.optional and not (path / p.name).is_dir())]
    needed = [p.name for p in parts] + [p.tokenizer for p in parts if p.tokenizer] + ["scheduler"]
    missing = [p for p in needed if not (path / p).is_dir()]
    if missing:
        raise UserError(f"model.path: {path} lacks the subfolder(s) {', '.join(missing)} (needed: {', '.join(needed)})")
    try:
        models = {p.name: p.build_class().from_pretrained(path, subfolder=p.name, local_files_only=True)
                  for p in parts}
        tokenizers = {p.name: p.tokenizer_type().from_pretrained(path, subfolder=p.tokenizer, local_files_only=True)
                      for p in parts if p.role == "text_encoder"}
        scheduler = getattr(diffusers, family.scheduler_class).from_pretrained(path, subfolder="scheduler",
                                                                               local_files_only=True)
    except LOAD_ERRORS as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model.path: {path} could not be loaded: {first[:300]}") from None
    check_unet(models[family.denoiser.name], models[family.vae.name], path)
    return Components(family, models, tokenizers, scheduler, str(path))


def _json_or_empty(p: Path) -> dict:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def check_family(path: Path) -> ModelFamily:
    """The family of a diffusers folder, from its model_index.json and its denoiser's config, before any weight
    loads; a family's model sdlora cannot train (the SDXL refiner, an extra-conditioning UNet) is refused by name."""
    index = _json_or_empty(path / "model_index.json")
    for family in FAMILIES.values():
        denoiser = path / family.denoiser.name
        config = _json_or_empty(denoiser / "config.json")
        if denoiser.is_dir() and family.claims_folder(index, config):
            family.check_folder(path, index, config)
            return family
    names = sorted({f.denoiser.name for f in FAMILIES.values()})
    raise UserError(f"model.path: {path} has no denoiser subfolder sdlora knows ({', '.join(names)}); {SUPPORTED}")


def check_unet(unet, vae, where) -> None:
    """A UNet whose input is not the VAE's latent (inpainting: 9 channels, an upscaler: 7) cannot train here."""
    latent = vae.config.latent_channels
    if unet.config.in_channels != latent or unet.config.out_channels != latent:
        raise UserError(f"model.path: {where}: its UNet takes {unet.config.in_channels} input channels, the VAE "
                        f"gives {latent} (an inpainting or upscaling model?); {SUPPORTED} with {latent}-channel UNets")


def load_vae(vae_path: str, *, config_dir: str | None = None, allow_pickle: bool = False, base_config=None):
    from diffusers import AutoencoderKL

    p = Path(os.path.expanduser(vae_path))
    if not p.exists():
        raise UserError(f"model.vae_path: no such file or folder: {p}")
    if p.is_dir():
        sub = "vae" if (p / "vae").is_dir() else None
        try:
            return AutoencoderKL.from_pretrained(p, subfolder=sub, local_files_only=True)
        except LOAD_ERRORS as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"model.vae_path: {p} could not be loaded as a VAE: {first[:300]}") from None
    from sdlora.model.single_file import load_single_file_vae

    return load_single_file_vae(p, config_dir=config_dir, allow_pickle=allow_pickle, base_config=base_config)
