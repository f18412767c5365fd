"""Rectified flow as the SD3 family's objective: model/objective.py's interface (latents, draw, fixed_times, noised,
prediction, plain, time_range) over the pure maths of model/flow_matching.py.

A "time" here is sigma in [0, 1] (x_t = (1 - sigma) x0 + sigma noise); `Noised.timesteps` is what
`SD3Transformer2DModel` takes, sigma * num_train_timesteps. Draw order per step, from the step's `Draws`: the noise
(`normal(x0's (C, h, w))`), then one number per example (`normal(())` for logit-normal, `uniform()` otherwise), the
same order DDPMObjective uses (noise, then timesteps). Sigmas are computed in float32 whatever dtype the draws come in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sdlora.errors import UserError
from sdlora.model import flow_matching as fm
from sdlora.model.objective import Noised, vae_latents


@dataclass(frozen=True)
class FlowMatchingObjective:
    """Rectified flow with `draw` (a flow_matching.SigmaDraw whose `shift` is set), the VAE config's scaling and
    shift, a target kind (flow_matching.TARGETS) and a loss weighting (flow_matching.WEIGHTINGS)."""

    draw_spec: fm.SigmaDraw
    scaling_factor: float
    shift_factor: float | None = None
    target: str = "velocity"
    weighting: str = "none"
    num_train_timesteps: int = 1000

    def __post_init__(self):
        if self.draw_spec.sampling not in fm.SAMPLINGS:
            raise UserError(f"sigma sampling {self.draw_spec.sampling!r}: allowed {', '.join(fm.SAMPLINGS)}")
        if self.target not in fm.TARGETS:
            raise UserError(f"flow-matching target {self.target!r}: allowed {', '.join(fm.TARGETS)}")
        if self.weighting not in fm.WEIGHTINGS:
            raise UserError(f"flow-matching loss weighting {self.weighting!r}: allowed {', '.join(fm.WEIGHTINGS)}")
        if self.draw_spec.shift is None:
            raise ValueError("FlowMatchingObjective needs a resolved shift (use from_configs)")
        lo, hi = self.draw_spec.sigma_range
        if not 0.0 <= lo < hi <= 1.0:
            raise UserError(f"sigma range {self.draw_spec.sigma_range}: needs 0 <= low < high <= 1")

    @classmethod
    def from_configs(cls, scheduler_config, vae_config, draw: fm.SigmaDraw | None = None, target: str = "velocity",
                     weighting: str = "none") -> "FlowMatchingObjective":
        """From the model's FlowMatchEulerDiscreteScheduler config (shift, num_train_timesteps) and VAE config
        (scaling_factor, shift_factor); a `draw` without a shift takes the scheduler's."""
        draw = draw or fm.SigmaDraw()
        if draw.shift is None:
            draw = fm.SigmaDraw(draw.sampling, draw.logit_mean, draw.logit_std, draw.mode_scale,
                                fm.shift_from_scheduler_config(scheduler_config), draw.sigma_range)
        return cls(draw, vae_config["scaling_factor"], vae_config.get("shift_factor"), target, weighting,
                   int(scheduler_config.get("num_train_timesteps", 1000)))

    @property
    def time_range(self) -> tuple[float, float]:
        """[low, high]: the training sigmas."""
        return self.draw_spec.sigma_range

    def latents(self, sample: torch.Tensor) -> torch.Tensor:
        return vae_latents(sample, self.scaling_factor, self.shift_factor)

    def _sigmas(self, value: torch.Tensor) -> torch.Tensor:
        lo, hi = self.draw_spec.sigma_range
        return lo + (hi - lo) * fm.shift_sigmas(value, self.draw_spec.shift)

    def draw(self, draws, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.draw_spec
        noise = draws.normal(tuple(x0.shape[1:]))
        if d.sampling == "logit_normal":
            value = fm.from_normal(draws.normal(()).float(), d.logit_mean, d.logit_std)
        else:
            value = fm.from_uniform(d.sampling, draws.uniform().float(), d.mode_scale)
        return noise, self._sigmas(value)

    def fixed_times(self, count: int) -> torch.Tensor:
        """`count` sigmas at the training distribution's quantiles (i + 1/2) / count, shifted and in range: the
        validation loss then weighs noise levels as training draws them. float32, (count,)."""
        d = self.draw_spec
        u = (torch.arange(count, dtype=torch.float64) + 0.5) / count
        if d.sampling == "logit_normal":  # the normal quantile: sqrt(2) erfinv(2u - 1)
            value = fm.from_normal(math.sqrt(2.0) * torch.erfinv(2 * u - 1), d.logit_mean, d.logit_std)
        else:  # uniform, mode and cosmap are maps of a uniform, monotone: quantiles map to quantiles
            value = fm.from_uniform(d.sampling, u, d.mode_scale)
        return self._sigmas(value).sort().values.float()

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, times: torch.Tensor) -> Noised:
        sigma = times.float()
        weight = None if self.weighting == "none" else fm.loss_weight(self.weighting, sigma)
        return Noised(fm.noisy_latents(x0, noise, sigma), fm.transformer_timestep(sigma, self.num_train_timesteps),
                      fm.training_target(self.target, x0, noise), weight, sigma, x0)

    def prediction(self, pred: torch.Tensor, noised: Noised) -> torch.Tensor:
        return fm.model_output(self.target, pred, noised.noisy, noised.times)

    def plain(self) -> "FlowMatchingObjective":
        return self  # no training-only perturbation (no noise offset) to remove
