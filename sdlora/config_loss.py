"""The loss section (`loss.*`): the pointwise loss, the DDPM families' weighting, noise and timestep draws, and the
rectified-flow keys of SD3 (`loss.flow.*`, config_flow.py). Part of the schema in config.py; the maths is the
objective's (model/objective.py, model/ddpm_draws.py) and training/losses.py's. `DDPM_ONLY` names the keys that only a
DDPM model (SD 1.x, 2.x, SDXL) honours: SD3 refuses them in one line (model/sd3.py)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from sdlora.config_base import Section
from sdlora.config_flow import FlowConfig

HUBER_TYPES = ("huber", "pseudo_huber", "smooth_l1")  # the types loss.huber_delta (and its schedule) parameterise


class LossConfig(Section):
    type: Literal["mse", "l1", "huber", "pseudo_huber", "smooth_l1"] = Field("mse", description="Pointwise diffusion loss on each latent element, d = prediction - target: mse d²; l1 |d|; huber (torch's Huber, delta c) 0.5·d² where |d| <= c, else c·(|d| - c/2); pseudo_huber (kohya's loss_type huber) 2c·(sqrt(d² + c²) - c); smooth_l1 (kohya's smooth_l1) 2·(sqrt(d² + c²) - c); c is loss.huber_delta on loss.huber_schedule.")
    huber_delta: float = Field(0.1, gt=0.0, description="The Huber parameter c of huber, pseudo_huber and smooth_l1 (kohya's huber_c).")
    huber_schedule: Literal["constant", "exponential", "snr"] = Field("constant", description="How c varies with the timestep t (kohya's huber_schedule; SD 1.x/2.x/SDXL): constant c·huber_scale; exponential huber_scale·c^(t/T) (T the scheduler's training timesteps; from huber_scale at t = 0 down to c·huber_scale); snr (1 - c) / (1 + sigma_t)² + c with sigma_t = sqrt((1 - ᾱ_t)/ᾱ_t): near 1 (MSE-like) at low noise, c at high noise.")
    huber_scale: float = Field(1.0, gt=0.0, description="Factor on c in the constant and exponential schedules (kohya's huber_scale; the snr schedule has none, as kohya).")
    min_snr_gamma: Optional[float] = Field(None, gt=0.0, description="Min-SNR loss weighting gamma (null = off; 5 is common).")
    debiased_estimation: bool = Field(False, description="Weigh each example by 1/sqrt(SNR_t) (epsilon) or 1/(SNR_t + 1) (v-prediction), SNR capped at 1000 (kohya's debiased_estimation_loss; Yu et al. 2024, arxiv.org/abs/2310.08442); multiplies the min-SNR weight when both are on.")
    noise_offset: float = Field(0.0, ge=0.0, description="Noise offset strength.")
    adaptive_noise_scale: float = Field(0.0, description="Add this times the absolute mean of each latent channel to the noise offset, per example and channel, the sum floored at 0 (kohya's adaptive_noise_scale; needs loss.noise_offset). 0: off.")
    noise_offset_random_strength: bool = Field(False, description="Draw the offset's strength uniformly in [0, noise_offset) for each example (kohya's noise_offset_random_strength, which draws one per batch).")
    multires_noise_iterations: int = Field(0, ge=0, description="Multi-resolution (pyramid) noise (kohya's multires_noise_iterations; J. Whitaker 2023): the noise plus this many levels of normal noise drawn at 1/r^i of the latent size (r uniform in [2, 4) per level) and bilinearly upsampled, weighted discount^i, then divided by its standard deviation per example. 0: off; 6-10 is kohya's advice.")
    multires_noise_discount: float = Field(0.3, ge=0.0, description="The weight discount^i of level i of the multi-resolution noise (kohya's multires_noise_discount).")
    ip_noise_gamma: float = Field(0.0, ge=0.0, description="Input perturbation (Ning et al. 2023, arxiv.org/abs/2301.11706; kohya's ip_noise_gamma): the denoiser's input is noised with noise + gamma·xi (xi a second normal), the target keeps the noise alone. 0: off; 0.1 is the paper's.")
    ip_noise_random_strength: bool = Field(False, description="Draw the perturbation's strength uniformly in [0, ip_noise_gamma) for each example (kohya's ip_noise_gamma_random_strength, which draws one per batch).")
    timestep_sampling: Literal["uniform", "logit_normal", "mode", "cosmap"] = Field("uniform", description="How each example's timestep is drawn in [min_timestep, max_timestep): uniform; logit_normal (sigmoid of a normal with loss.logit_mean / loss.logit_std: OneTrainer's LOGIT_NORMAL); mode (the SD3 paper's f_mode with loss.mode_scale: OneTrainer's HEAVY_TAIL); cosmap (the SD3 paper's cosine map, density 2/(pi·(1 - 2x + 2x²)): OneTrainer's COS_MAP). A value x in [0, 1] becomes min + floor(x·(max - min)).")
    logit_mean: float = Field(0.0, description="Mean of the logit-normal timestep draw (positive: noisier timesteps; OneTrainer's noising_bias).")
    logit_std: float = Field(1.0, gt=0.0, description="Standard deviation of the logit-normal timestep draw (OneTrainer's noising_weight + 1).")
    mode_scale: float = Field(1.29, description="Scale s of the mode timestep draw, 1 - u - s·(cos²(pi·u/2) - 1 + u) (OneTrainer's noising_weight for HEAVY_TAIL; 0 is uniform).")
    min_timestep: int = Field(0, ge=0, description="Smallest training timestep (inclusive).")
    max_timestep: Optional[int] = Field(None, ge=1, description="Largest training timestep (exclusive; default: the scheduler's count).")
    flow: FlowConfig = Field(default_factory=FlowConfig, description="Rectified flow (SD3 / SD3.5): sigma draws, target and weighting.")

    @model_validator(mode="after")
    def _range(self) -> "LossConfig":
        if self.max_timestep is not None and self.min_timestep >= self.max_timestep:
            raise ValueError(f"loss.min_timestep ({self.min_timestep}) must be < loss.max_timestep ({self.max_timestep})")
        return self


# The keys of the DDPM noise process (timesteps, SNR weighting, noise shapes): no meaning for rectified flow.
DDPM_ONLY = ("min_snr_gamma", "debiased_estimation", "noise_offset", "noise_offset_random_strength",
             "adaptive_noise_scale", "multires_noise_iterations", "multires_noise_discount", "ip_noise_gamma",
             "ip_noise_random_strength", "timestep_sampling", "logit_mean", "logit_std", "mode_scale", "min_timestep",
             "max_timestep", "huber_schedule")


def ddpm_keys_set(loss: LossConfig) -> list[str]:
    """The `DDPM_ONLY` keys of `loss` at a value other than their default, as dotted paths (`loss.noise_offset`)."""
    fields = type(loss).model_fields
    return [f"loss.{k}" for k in DDPM_ONLY if getattr(loss, k) != fields[k].get_default(call_default_factory=True)]
