"""The DDPM objective's random draws beyond Gaussian noise and uniform timesteps (model/objective.py's
`DDPMObjective` calls them): timestep distributions, multi-resolution (pyramid) noise and input perturbation.

Every number comes from a `Draws` (model/objective.py), in the order each function's docstring gives, so a step's
numbers depend on the run's seed only (and a resumed run, whose generator state is checkpointed, draws the same).

- Timesteps (`TimestepDraw`): a value x in [0, 1] from one of the SD3 paper's densities (Esser et al. 2024, section
  3.1; model/flow_matching.py has the maps), as OneTrainer draws discrete timesteps for SD 1.x/2.x/SDXL
  (modules/modelSetup/mixin/ModelSetupNoiseMixin.py: `x * (max - min) + min`, truncated): logit_normal
  (OneTrainer's LOGIT_NORMAL, sigmoid of N(mean, std)), mode (HEAVY_TAIL, f_mode(u; s)), cosmap (COS_MAP, drawn here
  through the map's inverse CDF where OneTrainer draws from the density on a grid). Uniform keeps `integers`.
- Pyramid noise (kohya-ss/sd-scripts library/custom_train_functions.py `pyramid_noise_like`, after J. Whitaker's
  "Multi-Resolution Noise for Diffusion Model Training", 2023).
- Input perturbation (Ning et al. 2023, "Input Perturbation Reduces Exposure Bias in Diffusion Models",
  arxiv.org/abs/2301.11706; kohya's `ip_noise_gamma`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sdlora.model import flow_matching as fm

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "mode", "cosmap")


def to_timesteps(value: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """Values in [0, 1] (B,) -> integer timesteps `low + floor(value * (high - low))` in [low, high) (int64; a value
    of exactly 1, or a mode map that leaves [0, 1] for a large scale, is clamped to the range)."""
    t = low + torch.floor(value.float() * (high - low))
    return t.clamp(low, high - 1).long()


@dataclass(frozen=True)
class TimestepDraw:
    """How a DDPM step draws its timesteps in [low, high): `sampling` one of TIMESTEP_SAMPLINGS, with the logit-normal
    mean and std and the mode scale (loss.timestep_sampling, loss.logit_mean, loss.logit_std, loss.mode_scale)."""

    sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    def __post_init__(self):
        if self.sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"timestep sampling {self.sampling!r}: allowed {', '.join(TIMESTEP_SAMPLINGS)}")

    def value(self, u: torch.Tensor) -> torch.Tensor:
        """The value in [0, 1] of the named density at `u`: a standard normal for logit_normal, else a uniform."""
        if self.sampling == "logit_normal":
            return fm.from_normal(u, self.logit_mean, self.logit_std)
        return fm.from_uniform(self.sampling, u, self.mode_scale)

    def draw(self, draws, low: int, high: int) -> torch.Tensor:
        """(B,) int64 timesteps: `draws.integers(low, high)` for uniform (the numbers sdlora always drew), else one
        `draws.normal(())` (logit_normal) or `draws.uniform()` (mode, cosmap) per example through `to_timesteps`."""
        if self.sampling == "uniform":
            return draws.integers(low, high)
        u = draws.normal(()) if self.sampling == "logit_normal" else draws.uniform()
        return to_timesteps(self.value(u.float()), low, high)

    def fixed(self, count: int, low: int, high: int) -> torch.Tensor:
        """(count,) int64 timesteps for the validation loss: evenly spread over [low, high - 1] for uniform; else the
        density's quantiles (i + 1/2) / count, so validation weighs noise levels as training draws them (sorted)."""
        if self.sampling == "uniform":
            return torch.linspace(low, high - 1, count).round().long()
        q = (torch.arange(count, dtype=torch.float64) + 0.5) / count
        if self.sampling == "logit_normal":  # the normal quantile sqrt(2)·erfinv(2q - 1)
            q = math.sqrt(2.0) * torch.erfinv(2 * q - 1)
        return to_timesteps(self.value(q), low, high).sort().values  # mode's map decreases in u: sorted after


def pyramid_noise(draws, noise: torch.Tensor, iterations: int, discount: float) -> torch.Tensor:
    """Multi-resolution noise (B, C, h, w) from `noise` (B, C, h, w), as kohya's `pyramid_noise_like`: for level
    i = 0 .. iterations - 1, r = 2 + 2·u (u = `draws.batch_uniform()`, one for the whole batch as kohya's
    `random.random()`), a normal `draws.normal((C, max(1, int(h / r^i)), max(1, int(w / r^i))))` bilinearly upsampled to
    (h, w) (align_corners False, as torch.nn.Upsample) times discount^i is added; it stops after the first level
    with a side of 1. The sum is divided by its standard deviation (unbiased) per example, where kohya divides by the
    whole batch's: here an example's noise does not depend on the batch (or process count) it is drawn in. Computed
    in float32, returned in `noise`'s dtype."""
    _, c, h, w = noise.shape
    out = noise.float()
    for i in range(iterations):
        r = 2.0 + 2.0 * draws.batch_uniform()
        hn, wn = max(1, int(h / r ** i)), max(1, int(w / r ** i))
        level = draws.normal((c, hn, wn)).float()
        out = out + F.interpolate(level, size=(h, w), mode="bilinear", align_corners=False) * discount ** i
        if hn == 1 or wn == 1:
            break
    return (out / out.flatten(1).std(dim=1).view(-1, 1, 1, 1)).to(noise.dtype)


def perturbed_noise(draws, noise: torch.Tensor, gamma: float, random_strength: bool) -> torch.Tensor:
    """Input perturbation: `noise + strength·xi` (B, C, h, w), xi = `draws.normal((C, h, w))`, strength `gamma`, or
    `gamma·draws.uniform()` per example (drawn after xi) with `random_strength` (kohya draws one per batch). The
    denoiser's input is noised with this; the target keeps `noise` (Ning et al. 2023, Algorithm 1)."""
    xi = draws.normal(tuple(noise.shape[1:]))
    if not random_strength:
        return noise + gamma * xi
    strength = gamma * draws.uniform()
    return noise + strength.to(xi.dtype).view(-1, *([1] * (noise.ndim - 1))) * xi
