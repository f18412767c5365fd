"""The pointwise diffusion loss (MSE, L1, Huber and its smooth forms), loss masks and per-example weights.

What the loss compares (the target, min-SNR and other per-example weights of the noise process) is the objective's
(model/objective.py); this module turns a prediction, a target and weights into the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sdlora.model.objective import ddpm_target, min_snr_weights, offset_noise

diffusion_target = ddpm_target  # the DDPM target under the name tests and benchmarks use


def pointwise_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "mse",
                   huber_delta: float | torch.Tensor = 0.1) -> torch.Tensor:
    """The loss of each element (B, ...) float32 for d = pred - target (loss.type): mse d²; l1 |d|; huber (torch's
    Huber with delta c) 0.5·d² where |d| <= c else c·(|d| - c/2); pseudo_huber 2c·(sqrt(d² + c²) - c) and smooth_l1
    2·(sqrt(d² + c²) - c), kohya's loss_type huber and smooth_l1 (library/train_util.py `conditional_loss`).
    `huber_delta` c: a number, or (B,) per example (the objective's schedule, `Noised.huber_delta`)."""
    pred, target = pred.float(), target.float()
    if kind == "mse":
        return F.mse_loss(pred, target, reduction="none")
    if kind == "l1":
        return F.l1_loss(pred, target, reduction="none")
    if kind == "huber" and not isinstance(huber_delta, torch.Tensor):
        return F.huber_loss(pred, target, reduction="none", delta=huber_delta)
    c = huber_delta
    if isinstance(c, torch.Tensor):
        c = c.to(pred.device, torch.float32).view(-1, *([1] * (pred.ndim - 1)))
    d = pred - target
    if kind == "huber":
        return torch.where(d.abs() <= c, 0.5 * d ** 2, c * (d.abs() - 0.5 * c))
    root = torch.sqrt(d ** 2 + c ** 2) - c
    if kind == "pseudo_huber":
        return 2 * c * root
    if kind == "smooth_l1":
        return 2 * root
    raise ValueError(f"loss type {kind!r}: allowed mse, l1, huber, pseudo_huber, smooth_l1")


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "mse", huber_delta: float | torch.Tensor = 0.1,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """`pointwise_loss` averaged over all but the batch dimension, in fp32; a (B, 1, h, w) `mask` weights each latent
    cell (all channels) first, and the mean stays over every element (kohya's masked loss: a mask of ones is no
    mask)."""
    elem = pointwise_loss(pred, target, kind, huber_delta)
    if mask is not None:
        elem = elem * mask.to(elem.device, elem.dtype)
    return elem.flatten(1).mean(1)


def weighted_loss(pred, target, loss_cfg, *weights: torch.Tensor | None, mask: torch.Tensor | None = None,
                  huber_delta: torch.Tensor | None = None):
    """The batch mean of `per_sample_loss` times each (B,) weight in turn (None: 1): the objective's per-example
    weight (min-SNR, debiased estimation), then the data's (`loss_weight`: data.prior_loss_weight). `huber_delta`:
    the objective's per-example Huber parameter (`Noised.huber_delta`); None: loss.huber_delta · loss.huber_scale
    (the constant schedule)."""
    delta = huber_delta if huber_delta is not None else loss_cfg.huber_delta * loss_cfg.huber_scale
    per = per_sample_loss(pred, target, loss_cfg.type, delta, mask)
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
