"""The diffusion loss and its options (prediction type, min-SNR weighting, Huber)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def diffusion_target(noise_scheduler, latents, noise, timesteps) -> torch.Tensor:
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {kind!r} (epsilon, v_prediction)")


def snr(noise_scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep."""
    ac = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return ac / (1.0 - ac)


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v-prediction."""
    s = snr(noise_scheduler, timesteps)
    clipped = torch.minimum(s, torch.full_like(s, gamma))
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (s + 1.0)
    return clipped / s


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


def diffusion_loss(pred, target, timesteps, noise_scheduler, loss_cfg, loss_weight: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None):
    per = per_sample_loss(pred, target, loss_cfg.type, loss_cfg.huber_delta, mask)
    if loss_cfg.min_snr_gamma is not None:
        per = per * min_snr_weights(noise_scheduler, timesteps, loss_cfg.min_snr_gamma)
    if loss_weight is not None:
        per = per * loss_weight.to(per.device, per.dtype)
    return per.mean()


def sample_noise(latents: torch.Tensor, noise_offset: float, generator=None) -> torch.Tensor:
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, generator=generator,
                                                   device=latents.device, dtype=latents.dtype)
    return noise
