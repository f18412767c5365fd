"""The pointwise diffusion loss (MSE or Huber), loss masks and per-example weights.

What the loss compares (the target, min-SNR and other per-example weights of the noise process) is the objective's
(model/objective.py); this module turns a prediction, a target and weights into the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sdlora.model.objective import ddpm_target, min_snr_weights, offset_noise

diffusion_target = ddpm_target  # the DDPM target under the name tests and benchmarks use


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "mse", huber_delta: float = 0.1,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over all but the batch dimension, in fp32; a (B, 1, h, w) `mask` weights each latent cell (all
    channels) first, and the mean stays over every element (kohya's masked loss: a mask of ones is no mask)."""
    pred, target = pred.float(), target.float()
    if kind == "mse":
        elem = F.mse_loss(pred, target, reduction="none")
    else:
        elem = F.huber_loss(pred, target, reduction="none", delta=huber_delta)
    if mask is not None:
        elem = elem * mask.to(elem.device, elem.dtype)
    return elem.flatten(1).mean(1)


def weighted_loss(pred, target, loss_cfg, *weights: torch.Tensor | None, mask: torch.Tensor | None = None):
    """The batch mean of `per_sample_loss` times each (B,) weight in turn (None: 1): the objective's per-example
    weight (min-SNR), then the data's (`loss_weight`: data.prior_loss_weight)."""
    per = per_sample_loss(pred, target, loss_cfg.type, loss_cfg.huber_delta, mask)
    for weight in weights:
        if weight is not None:
            per = per * weight.to(per.device, per.dtype)
    return per.mean()


def diffusion_loss(pred, target, timesteps, noise_scheduler, loss_cfg, loss_weight: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None):
    """`weighted_loss` with DDPM's min-SNR weights (loss.min_snr_gamma) and `loss_weight`."""
    snr_weight = None
    if loss_cfg.min_snr_gamma is not None:
        snr_weight = min_snr_weights(noise_scheduler, timesteps, loss_cfg.min_snr_gamma)
    return weighted_loss(pred, target, loss_cfg, snr_weight, loss_weight, mask=mask)


def sample_noise(latents: torch.Tensor, noise_offset: float, generator=None) -> torch.Tensor:
    """Noise like `latents` with the noise offset (model/objective.offset_noise), from `generator`."""
    def normal(shape):
        return torch.randn((latents.shape[0], *shape), generator=generator, device=latents.device, dtype=latents.dtype)

    return offset_noise(normal, latents.shape[1:], noise_offset)
