"""Validation loss (`validation`): the diffusion loss on held-out images with fixed latents, noise and timesteps.

The held-out images are a folder (`validation.path`) or `validation.num_images` images taken out of the
training set (a seeded pick, the same for every run of the same data and seed). Each is centre-cropped to its
bucket, unflipped, with its caption as written (prefix and suffix, no dropout or shuffling), and encoded once
by the VAE to the mean of its latent distribution. Each gets `validation.timesteps` times over the objective's
training range as training draws them (`fixed_times`: evenly spread, or a distribution's quantiles) and one noise tensor per timestep from a generator seeded with `validation.seed`
(on the CPU: the same numbers on every device). All of it is fixed at start, so the loss at a step depends
only on the weights at that step: it compares across runs of the same data and across a kill-and-resume. It
uses no global RNG, so turning it on does not change training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdlora.data.captions import base_caption
from sdlora.data.pipeline import conditioning_fields, size_conditioning
from sdlora.data.samples import center_offset, load_pixels
from sdlora.errors import UserError
from sdlora.model.text import tokenize
from sdlora.training.offload import encode_anywhere
from sdlora.training.step import step_loss


@dataclass
class HeldOutImage:
    latents: torch.Tensor  # (K, C, h, w): the latent mean as training latents (objective.latents), repeated per time
    noise: torch.Tensor  # (K, C, h, w)
    timesteps: torch.Tensor  # (K,): the objective's times (DDPM: timesteps)
    caption: str
    sizes: tuple  # SDXL's micro-conditioning of the centre crop (data.pipeline.size_conditioning)


def held_out_samples(cfg, training_data, say) -> list:
    """The validation images: the folder's, or those build_training_data held out of training."""
    if cfg.validation.path is None:
        return training_data.held_out
    from sdlora.config import SubsetConfig
    from sdlora.data.pipeline import scan
    from sdlora.data.sources import discover

    shared = {k: getattr(cfg.data, k) for k in ("caption_extension", "prefix", "suffix")}
    subsets = [SubsetConfig(path=cfg.validation.path, **shared)]
    samples, skipped = scan(discover(subsets, 1.0), cfg.data)
    if not samples:
        raise UserError(f"validation.path: no usable images in {cfg.validation.path}")
    if skipped:
        say(f"sdlora: validation: {len(skipped)} images skipped (first: {skipped[0][0]}: {skipped[0][1]})")
    return samples


class ValidationLoss:
    def __init__(self, cfg, comps, samples: list, objective, text_cache=None):
        self.cfg, self.comps, self.objective = cfg, comps, objective
        self.text_cache = text_cache  # frozen encoders: the run's cache (each held-out caption encoded once)
        v = cfg.validation
        gen = torch.Generator().manual_seed(v.seed)
        vae = comps.vae
        params = next(vae.parameters())
        spread = objective.fixed_times(v.timesteps)
        self.images = []
        for sample in samples:
            offset = center_offset(sample)
            pixels = load_pixels(sample, offset, False, cfg.data)[None]
            with torch.no_grad():
                mean = vae.encode(pixels.to(params.device, params.dtype)).latent_dist.mean.float().cpu()
            latents = objective.latents(mean).expand(v.timesteps, -1, -1, -1).contiguous()
            noise = torch.randn(latents.shape, generator=gen)
            caption = base_caption(sample.item.caption, cfg.data)
            self.images.append(HeldOutImage(latents, noise, spread.clone(), caption, size_conditioning(sample, offset, False)))

    @torch.no_grad()
    def measure(self, denoiser, text_encoders: list, accelerator) -> float:
        """The mean loss over every held-out image and time, with the live (adapted) models; `text_encoders`: the
        family's, in its order (`Components.text_encoders`)."""
        family, device = self.comps.family, accelerator.device
        total = 0.0
        for image in self.images:
            latents, noise, t = image.latents.to(device), image.noise.to(device), image.timesteps.to(device)
            noised = self.objective.noised(latents, noise, t)
            captions = [image.caption] * len(t)
            ids = [tokenize(tok, captions, self.cfg.data.max_token_length).to(device) for tok in self.comps.tokenizers]
            embeddings = (self.text_cache(ids) if self.text_cache is not None
                          else encode_anywhere(family, text_encoders, ids, self.cfg.text_encoder.clip_skip))
            batch = conditioning_fields(captions, [image.sizes] * len(t))
            total += float(step_loss(self.objective, family, denoiser, noised, embeddings, batch, self.cfg.loss,
                                     accelerator.autocast))
        return total / len(self.images)


def make_validation(cfg, comps, training_data, objective, say, text_cache=None) -> ValidationLoss | None:
    if not cfg.validation.every_steps:
        return None
    samples = held_out_samples(cfg, training_data, say)
    if cfg.validation.path is not None:  # the training data's were checked when it was built
        from sdlora.data.pipeline import check_bucket_sides

        check_bucket_sides(samples, training_data.latent_factor * comps.family.latent_multiple(comps.denoiser),
                           comps.family.title)
    sizes = len({s.resolution for s in samples})
    at = f" at {sizes} base resolutions" if sizes > 1 else ""
    say(f"sdlora: validation: {len({s.item for s in samples})} held-out images{at} x {cfg.validation.timesteps} "
        f"timesteps every {cfg.validation.every_steps} steps")
    return ValidationLoss(cfg, comps, samples, objective, text_cache)


def validation_due(step: int, cfg) -> bool:
    every = cfg.validation.every_steps
    return bool(every) and (step % every == 0 or step == cfg.train.max_steps)
