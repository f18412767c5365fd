"""The noise process a denoiser was trained with, as one object (an "objective").

An objective answers what one training step needs from the noise process, whatever the family:

    latents(sample)                -> x0: the VAE's output (unscaled, (B, C, h, w)) as training latents,
                                      (sample - shift_factor) * scaling_factor, both from the VAE config
                                      (shift absent: 0; SD 1.x/2.x/SDXL have none, SD3 has one)
    draw(draws, x0)                -> (noise, times[, input_noise]): the random part of a step, from a `Draws`
                                      (below): noise like x0, one time per example (B,), and where the input is
                                      perturbed (DDPM's ip_noise_gamma) the noise the input is made with
    time_range                     -> (low, high): the training range of times (DDPM: timesteps, high exclusive)
    fixed_times(count)             -> (count,) times over the training range as training draws them (the
                                      validation loss)
    noised(x0, noise, times[, input_noise]) -> Noised: the denoiser's input (made with input_noise where given),
                                      its timestep argument, the target (from noise), the per-example loss weight
                                      and Huber parameter; deterministic
    prediction(pred, noised)       -> what the loss compares with `noised.target` (the raw prediction, or a
                                      preconditioned one)
    plain()                        -> the same objective without training-only perturbations (noise offset,
                                      pyramid noise, input perturbation): what estimates such as the row Fisher
                                      measure

A "time" is the objective's own parameter of the noise level: an integer timestep for DDPM, a sigma in (0, 1) for
rectified flow. `Noised.timesteps` is what the denoiser's timestep argument takes (DDPM: the integer timestep;
SD3's transformer: sigma * 1000). A rectified-flow objective fits this interface unchanged (`../shared/notes/sd3.md`;
diffusers' train_dreambooth_lora_sd3.py): `draw` takes `draws.normal((C, h, w))` as noise and a logit-normal
(`draws.normal(())`, sigmoid) or uniform (`draws.uniform()`) u, shifted to sigma = s·u / (1 + (s - 1)·u);
`noised` gives x_t = (1 - sigma)·x0 + sigma·noise, timesteps sigma·1000, target noise - x0 (or x0, with
`prediction` = pred·(-sigma) + x_t when preconditioned) and the weighting per sigma (none, sigma_sqrt, cosmap).

`Draws` is any object with `normal(shape) -> (B, *shape)`, `uniform() -> (B,)`, `integers(low, high) -> (B,)` and
`batch_uniform() -> float` (one number for the whole batch) on the step's device (training/draws.py: the training
step's global-batch draws, and a plain generator's); a shaped normal comes in the latents' dtype, per-example values
(`normal(())`, `uniform()`) in float32.
Every draw goes through it, in the order the objective asks, so a step's numbers depend on the seed only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from sdlora.model.ddpm_draws import TimestepDraw, perturbed_noise, pyramid_noise


@dataclass
class Noised:
    """One step's noised batch: `noisy` (B, C, h, w) the denoiser's input; `timesteps` (B,) its timestep argument;
    `target` (B, C, h, w); `weight` (B,) float32 per-example loss weight, None for 1; `times` (B,) the objective's
    own noise levels (DDPM: = timesteps); `x0` (B, C, h, w) the clean latents; `huber_delta` (B,) float32 the Huber
    parameter per example where it follows the noise level (loss.huber_schedule), None for loss.huber_delta."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor | None
    times: torch.Tensor
    x0: torch.Tensor
    huber_delta: torch.Tensor | None = None


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


SNR_CAP = 1000.0  # kohya's cap on SNR in the debiased weight: at t = 0 the SNR of SD's schedules is about 1175


def debiased_weights(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Debiased estimation (Yu et al. 2024, "Debias the Training of Diffusion Models", arxiv.org/abs/2310.08442), as
    kohya's `apply_debiased_estimation` (library/custom_train_functions.py): with s = min(SNR, 1000), 1/sqrt(s) for
    epsilon and 1/(s + 1) for v-prediction (kohya-ss/sd-scripts#1058: the v form stays finite at zero terminal
    SNR). (B,) float32."""
    s = torch.clamp(snr(scheduler, timesteps), max=SNR_CAP)
    if scheduler.config.prediction_type == "v_prediction":
        return 1.0 / (s + 1.0)
    return 1.0 / torch.sqrt(s)


def huber_deltas(scheduler, timesteps: torch.Tensor, schedule: str, c: float, scale: float = 1.0) -> torch.Tensor:
    """The Huber parameter at each timestep (B,) float32, as kohya's `get_huber_threshold_if_needed`
    (library/train_util.py): exponential `scale·c^(t/T)` (T = num_train_timesteps; kohya's exp(-alpha·t)·scale with
    alpha = -ln(c)/T), snr `(1 - c)/(1 + sigma_t)² + c` with sigma_t = sqrt((1 - ᾱ_t)/ᾱ_t) (no scale, as kohya),
    constant `c·scale`."""
    t = timesteps.float()
    if schedule == "exponential":
        return scale * torch.exp(math.log(c) * t / scheduler.config.num_train_timesteps)
    if schedule == "snr":
        ac = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
        sigma = torch.sqrt((1.0 - ac) / ac)
        return (1.0 - c) / (1.0 + sigma) ** 2 + c
    if schedule == "constant":
        return torch.full_like(t, c * scale)
    raise ValueError(f"Huber schedule {schedule!r}: allowed constant, exponential, snr")


def offset_noise(normal, shape: tuple, noise_offset: float, strength=None,
                 adaptive: torch.Tensor | None = None) -> torch.Tensor:
    """Gaussian noise (B, *shape) from `normal`, plus noise_offset times a per-channel normal (B, C, 1, 1) (the
    "noise offset" of Guttenberg 2023, crosslabs.org/blog/diffusion-with-offset-noise). As kohya's
    `apply_noise_offset` (library/custom_train_functions.py): `strength`, a callable giving (B,) factors in [0, 1)
    on noise_offset, called between the two normals (noise_offset_random_strength; kohya draws one per batch);
    `adaptive` (B, C, 1, 1) added to the offset, the sum floored at 0 (adaptive_noise_scale · |channel mean of x0|)."""
    noise = normal(tuple(shape))
    if noise_offset:
        offset = noise_offset
        if strength is not None:
            offset = (noise_offset * strength()).to(noise.dtype).view(-1, 1, 1, 1)
        if adaptive is not None:
            offset = torch.clamp(offset + adaptive.to(noise.dtype), min=0.0)
        noise = noise + offset * normal((shape[0], 1, 1))
    return noise


@dataclass(frozen=True)
class DDPMObjective:
    """DDPM (SD 1.x, 2.x, SDXL): epsilon or v-prediction as the scheduler says (its `rescale_betas_zero_snr`
    included: zero terminal SNR is a property of its betas), integer timesteps in [min_timestep, max_timestep)
    drawn by `timestep_draw` (uniform by default; model/ddpm_draws.py), min-SNR and debiased-estimation weights,
    noise offset, pyramid noise, input perturbation, a Huber parameter schedule. `scheduler`: a diffusers
    DDPMScheduler.

    Draw order per step, each where on: the noise (`normal((C, h, w))`); the offset (its random strength
    `uniform()`, then `normal((C, 1, 1))`); the pyramid levels (`batch_uniform()` and `normal` per level); the
    timesteps (`TimestepDraw.draw`); the perturbation (`normal((C, h, w))`, then `uniform()` for a random strength).
    With none of the new options on, the numbers are those sdlora always drew."""

    scheduler: object
    scaling_factor: float
    shift_factor: float | None = None
    min_timestep: int = 0
    max_timestep: int | None = None  # exclusive; None: the scheduler's num_train_timesteps
    min_snr_gamma: float | None = None
    noise_offset: float = 0.0
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float = 0.0
    debiased: bool = False
    timestep_draw: TimestepDraw = field(default_factory=TimestepDraw)
    multires_iterations: int = 0
    multires_discount: float = 0.3
    ip_noise_gamma: float = 0.0
    ip_noise_random_strength: bool = False
    huber_schedule: str = "constant"  # exponential, snr: `Noised.huber_delta` per example; constant: the loss's own
    huber_delta: float = 0.1
    huber_scale: float = 1.0

    @classmethod
    def from_config(cls, scheduler, vae_config, loss_cfg) -> "DDPMObjective":
        """From the training noise scheduler, the VAE config (scaling_factor, shift_factor) and the loss section."""
        c = loss_cfg
        return cls(scheduler, vae_config.scaling_factor, vae_config.get("shift_factor"), c.min_timestep, c.max_timestep,
                   c.min_snr_gamma, c.noise_offset, c.noise_offset_random_strength, c.adaptive_noise_scale,
                   debiased=c.debiased_estimation,
                   timestep_draw=TimestepDraw(c.timestep_sampling, c.logit_mean, c.logit_std, c.mode_scale),
                   multires_iterations=c.multires_noise_iterations, multires_discount=c.multires_noise_discount,
                   ip_noise_gamma=c.ip_noise_gamma, ip_noise_random_strength=c.ip_noise_random_strength,
                   huber_schedule=c.huber_schedule, huber_delta=c.huber_delta, huber_scale=c.huber_scale)

    @property
    def time_range(self) -> tuple[int, int]:
        """[low, high): the training timesteps."""
        return self.min_timestep, self.max_timestep or self.scheduler.config.num_train_timesteps

    def latents(self, sample: torch.Tensor) -> torch.Tensor:
        return vae_latents(sample, self.scaling_factor, self.shift_factor)

    def draw(self, draws, x0: torch.Tensor) -> tuple[torch.Tensor, ...]:
        adaptive = self.adaptive_noise_scale * x0.float().mean(dim=(2, 3), keepdim=True).abs() \
            if self.adaptive_noise_scale else None
        noise = offset_noise(draws.normal, x0.shape[1:], self.noise_offset,
                             draws.uniform if self.noise_offset_random_strength else None, adaptive)
        if self.multires_iterations:
            noise = pyramid_noise(draws, noise, self.multires_iterations, self.multires_discount)
        times = self.timestep_draw.draw(draws, *self.time_range)
        if not self.ip_noise_gamma:
            return noise, times
        return noise, times, perturbed_noise(draws, noise, self.ip_noise_gamma, self.ip_noise_random_strength)

    def fixed_times(self, count: int) -> torch.Tensor:
        return self.timestep_draw.fixed(count, *self.time_range)

    def weight(self, times: torch.Tensor) -> torch.Tensor | None:
        """The per-example loss weight (B,): min-SNR times debiased estimation, each where on; None when neither."""
        weight = min_snr_weights(self.scheduler, times, self.min_snr_gamma) if self.min_snr_gamma is not None else None
        if self.debiased:
            debiased = debiased_weights(self.scheduler, times)
            weight = debiased if weight is None else weight * debiased
        return weight

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, times: torch.Tensor,
               input_noise: torch.Tensor | None = None) -> Noised:
        delta = None
        if self.huber_schedule != "constant":
            delta = huber_deltas(self.scheduler, times, self.huber_schedule, self.huber_delta, self.huber_scale)
        noisy = self.scheduler.add_noise(x0, noise if input_noise is None else input_noise, times)
        return Noised(noisy, times, ddpm_target(self.scheduler, x0, noise, times), self.weight(times), times, x0, delta)

    def prediction(self, pred: torch.Tensor, noised: Noised) -> torch.Tensor:
        return pred

    def plain(self) -> "DDPMObjective":
        return replace(self, noise_offset=0.0, multires_iterations=0, ip_noise_gamma=0.0)  # offset 0: none adapts
