"""The noise process a denoiser was trained with, as one object (an "objective").

An objective answers what one training step needs from the noise process, whatever the family:

    latents(sample)                -> x0: the VAE's output (unscaled, (B, C, h, w)) as training latents,
                                      (sample - shift_factor) * scaling_factor, both from the VAE config
                                      (shift absent: 0; SD 1.x/2.x/SDXL have none, SD3 has one)
    draw(draws, x0)                -> (noise, times): the random part of a step, from a `Draws` (below):
                                      noise like x0, and one time per example (B,)
    time_range                     -> (low, high): the training range of times (DDPM: timesteps, high exclusive)
    fixed_times(count)             -> (count,) times spread evenly over the training range (the validation loss)
    noised(x0, noise, times)       -> Noised: the denoiser's input, its timestep argument, the target and the
                                      per-example loss weight; deterministic
    prediction(pred, noised)       -> what the loss compares with `noised.target` (the raw prediction, or a
                                      preconditioned one)
    plain()                        -> the same objective without training-only perturbations (noise offset):
                                      what estimates such as the row Fisher measure

A "time" is the objective's own parameter of the noise level: an integer timestep for DDPM, a sigma in (0, 1) for
rectified flow. `Noised.timesteps` is what the denoiser's timestep argument takes (DDPM: the integer timestep;
SD3's transformer: sigma * 1000). A rectified-flow objective fits this interface unchanged (`../shared/notes/sd3.md`;
diffusers' train_dreambooth_lora_sd3.py): `draw` takes `draws.normal((C, h, w))` as noise and a logit-normal
(`draws.normal(())`, sigmoid) or uniform (`draws.uniform()`) u, shifted to sigma = s·u / (1 + (s - 1)·u);
`noised` gives x_t = (1 - sigma)·x0 + sigma·noise, timesteps sigma·1000, target noise - x0 (or x0, with
`prediction` = pred·(-sigma) + x_t when preconditioned) and the weighting per sigma (none, sigma_sqrt, cosmap).

`Draws` is any object with `normal(shape) -> (B, *shape)`, `uniform() -> (B,)` and `integers(low, high) -> (B,)`
on the step's device (training/draws.py: the training step's global-batch draws, and a plain generator's); a
shaped normal comes in the latents' dtype, per-example values (`normal(())`, `uniform()`) in float32.
Every draw goes through it, in the order the objective asks, so a step's numbers depend on the seed only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class Noised:
    """One step's noised batch: `noisy` (B, C, h, w) the denoiser's input; `timesteps` (B,) its timestep argument;
    `target` (B, C, h, w); `weight` (B,) float32 per-example loss weight, None for 1; `times` (B,) the objective's
    own noise levels (DDPM: = timesteps); `x0` (B, C, h, w) the clean latents."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor | None
    times: torch.Tensor
    x0: torch.Tensor


def vae_latents(sample: torch.Tensor, scaling_factor: float, shift_factor: float | None) -> torch.Tensor:
    """(sample - shift_factor) * scaling_factor, the VAE config's normalisation (diffusers' SD3 pipeline decodes
    latents / scaling_factor + shift_factor); no subtraction at all without a shift."""
    if shift_factor:
        sample = sample - shift_factor
    return sample * scaling_factor


# ---------------------------------------------------------------------------------------------- DDPM maths


def ddpm_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The epsilon (noise) or v-prediction target (v = sqrt(ᾱ)·ε - sqrt(1 - ᾱ)·x0, Salimans & Ho 2022)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {kind!r} (epsilon, v_prediction)")


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep (B,), float32."""
    ac = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return ac / (1.0 - ac)


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v-prediction."""
    s = snr(scheduler, timesteps)
    clipped = torch.minimum(s, torch.full_like(s, gamma))
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (s + 1.0)
    return clipped / s


def offset_noise(normal, shape: tuple, noise_offset: float) -> torch.Tensor:
    """Gaussian noise (B, *shape) from `normal`, plus noise_offset times a per-channel normal (B, C, 1, 1) (the
    "noise offset" of Guttenberg 2023, crosslabs.org/blog/diffusion-with-offset-noise)."""
    noise = normal(tuple(shape))
    if noise_offset:
        noise = noise + noise_offset * normal((shape[0], 1, 1))
    return noise


@dataclass(frozen=True)
class DDPMObjective:
    """DDPM (SD 1.x, 2.x, SDXL): epsilon or v-prediction as the scheduler says (its `rescale_betas_zero_snr`
    included: zero terminal SNR is a property of its betas), integer timesteps drawn uniformly in
    [min_timestep, max_timestep), min-SNR weighting, noise offset. `scheduler`: a diffusers DDPMScheduler."""

    scheduler: object
    scaling_factor: float
    shift_factor: float | None = None
    min_timestep: int = 0
    max_timestep: int | None = None  # exclusive; None: the scheduler's num_train_timesteps
    min_snr_gamma: float | None = None
    noise_offset: float = 0.0

    @classmethod
    def from_config(cls, scheduler, vae_config, loss_cfg) -> "DDPMObjective":
        """From the training noise scheduler, the VAE config (scaling_factor, shift_factor) and the loss section."""
        return cls(scheduler, vae_config.scaling_factor, vae_config.get("shift_factor"), loss_cfg.min_timestep,
                   loss_cfg.max_timestep, loss_cfg.min_snr_gamma, loss_cfg.noise_offset)

    @property
    def time_range(self) -> tuple[int, int]:
        """[low, high): the training timesteps."""
        return self.min_timestep, self.max_timestep or self.scheduler.config.num_train_timesteps

    def latents(self, sample: torch.Tensor) -> torch.Tensor:
        return vae_latents(sample, self.scaling_factor, self.shift_factor)

    def draw(self, draws, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        noise = offset_noise(draws.normal, x0.shape[1:], self.noise_offset)
        return noise, draws.integers(*self.time_range)

    def fixed_times(self, count: int) -> torch.Tensor:
        low, high = self.time_range
        return torch.linspace(low, high - 1, count).round().long()

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, times: torch.Tensor) -> Noised:
        weight = min_snr_weights(self.scheduler, times, self.min_snr_gamma) if self.min_snr_gamma is not None else None
        return Noised(self.scheduler.add_noise(x0, noise, times), times, ddpm_target(self.scheduler, x0, noise, times),
                      weight, times, x0)

    def prediction(self, pred: torch.Tensor, noised: Noised) -> torch.Tensor:
        return pred

    def plain(self) -> "DDPMObjective":
        return replace(self, noise_offset=0.0)
