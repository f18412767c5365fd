"""Rectified flow (the noise process of SD3 / SD3.5), as pure functions on tensors.

Source: Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis" (the SD3 paper,
arXiv 2403.03206), section 3.1; the conventions are diffusers' (`FlowMatchEulerDiscreteScheduler`,
`training_utils.compute_density_for_timestep_sampling` / `compute_loss_weighting_for_sd3`,
`examples/dreambooth/train_dreambooth_lora_sd3.py`) and kohya-ss/sd-scripts' (`library/sd3_train_utils.py`,
`get_noisy_model_input_and_timesteps`; `sd3_train_network.py`). Each function names the one it is tested against.

- Noising: `x_t = (1 - sigma) * x0 + sigma * noise`, sigma in [0, 1] (0: the image, 1: pure noise).
- The transformer is called with `timestep = sigma * num_train_timesteps` (a float; 1000 in SD3's scheduler config).
- Targets (`TARGETS`): "velocity", the model output compared with `noise - x0` (the paper; diffusers' script with
  `--precondition_outputs 0`; SimpleTuner), and "x0", the output preconditioned to `x0_hat = pred * (-sigma) + x_t`
  and compared with `x0` (diffusers' script by default, kohya). Since `x0_hat - x0 = sigma * ((noise - x0) - pred)`,
  the x0 form's squared error is the velocity form's times `sigma**2`: the same loss with a per-example weight for
  MSE (not for a Huber loss, which is not homogeneous), and with diffusers' `sigma_sqrt` weighting (`sigma**-2`) the
  x0 form becomes the plain velocity loss again.
- Sigma draws (`SAMPLINGS`), each from an explicit `torch.Generator` (same generator state, same draws: resume-exact):
  "uniform" (kohya's default), "logit_normal" (mean, std; the paper's rf/lognorm(0, 1), diffusers' default), "mode"
  (scale; the paper's f_mode), "cosmap" (the paper's inverse-CDF map `1 - 1/(tan(pi u / 2) + 1)`, whose density
  is diffusers' cosmap loss weight). Then the shift, then the sigma range.
- Shift (`shift_sigmas`): `sigma' = s * sigma / (1 + (s - 1) * sigma)` (the paper's resolution shift with
  s = sqrt(m / n); SD3's scheduler config has s = 3.0). Applied to the drawn sigma, continuously, as kohya does with
  `--training_shift`. diffusers' script instead indexes the scheduler's 1000-point shifted grid with
  `floor(1000 u)`; that grid is descending, so its sigma is `shift(1 - floor(1000 u) / 1000)`: the same
  distribution for uniform and a logit-normal of mean 0 (both symmetric about 1/2), mirrored for a logit mean != 0
  and for "mode". Here, as in the paper and kohya, the drawn value is sigma itself (a positive logit mean: noisier).
- Loss weightings (`WEIGHTINGS`): "none", "sigma_sqrt" (`sigma**-2`), "cosmap" (`2 / (pi (1 - 2 sigma + 2 sigma**2))`),
  as diffusers' `compute_loss_weighting_for_sd3` (its "logit_normal" and "mode" schemes weight by 1).

How this becomes the family's objective: model/flow_objective.py's `FlowMatchingObjective` implements
model/objective.py's interface with these functions (objective.vae_latents for training latents; the sigma draw from the
step's Draws through `from_normal` / `from_uniform`, `shift_sigmas` and the sigma range; `noisy_latents`,
`transformer_timestep`, `training_target` and `loss_weight` for the noised batch; `model_output` for the prediction).
Min-SNR, noise offset, zero terminal SNR and v-prediction are DDPM notions
with no meaning here: the family refuses them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sdlora.errors import UserError

SAMPLINGS = ("uniform", "logit_normal", "mode", "cosmap")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
TARGETS = ("velocity", "x0")


@dataclass(frozen=True)
class SigmaDraw:
    """How a step's sigmas are drawn. `shift` None: the model's scheduler config (`shift_from_scheduler_config`)."""

    sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29  # diffusers' script default (the paper's f_mode scale)
    shift: float | None = None
    sigma_range: tuple[float, float] = (0.0, 1.0)


def shift_from_scheduler_config(config) -> float:
    """The model's shift: `shift` of its FlowMatchEulerDiscreteScheduler config (a mapping). SD3 / SD3.5: 3.0.
    Raises UserError for a resolution-dependent (dynamic) shift, which this objective does not implement."""
    if config.get("use_dynamic_shifting", False):
        raise UserError("the model's scheduler uses a resolution-dependent shift (use_dynamic_shifting: true), "
                        "which SD3 training does not implement: set a fixed shift")
    return float(config.get("shift", 1.0))


def shift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """`shift * sigma / (1 + (shift - 1) * sigma)`: maps [0, 1] onto [0, 1], moving mass to the noisy end for
    shift > 1. The same formula FlowMatchEulerDiscreteScheduler applies to its grid (tested against it)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def from_uniform(sampling: str, u: torch.Tensor, mode_scale: float = 1.29) -> torch.Tensor:
    """The value in [0, 1] (before the shift) that "uniform", "mode" or "cosmap" makes of a uniform `u`:
    u itself; the paper's f_mode `1 - u - s (cos^2(pi u / 2) - 1 + u)` (as diffusers); the paper's cosmap map
    `1 - 1 / (tan(pi u / 2) + 1)` (eq. 20), whose density is `2 / (pi (1 - 2t + 2t^2))`."""
    if sampling == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    if sampling == "cosmap":
        return 1 - 1 / (torch.tan(math.pi * u / 2) + 1)
    return u


def from_normal(z: torch.Tensor, logit_mean: float = 0.0, logit_std: float = 1.0) -> torch.Tensor:
    """The logit-normal value `sigmoid(logit_mean + logit_std * z)` of a standard normal `z`."""
    return torch.sigmoid(z * logit_std + logit_mean)


def draw_density(sampling: str, n: int, generator: torch.Generator, logit_mean: float = 0.0, logit_std: float = 1.0,
                 mode_scale: float = 1.29, device="cpu") -> torch.Tensor:
    """`n` values in [0, 1] from the named density, before the shift; shape (n,), float32: one uniform per value
    (`from_uniform`), or one standard normal for "logit_normal" (`from_normal`). The numbers of diffusers'
    `compute_density_for_timestep_sampling` with the same generator state: identical for "uniform" and "mode",
    within float32 rounding for "logit_normal" (diffusers draws `torch.normal(mean, std)`, which rounds
    `mean + std * z` once less). Raises UserError for another name."""
    if sampling == "logit_normal":
        return from_normal(torch.randn(n, device=device, generator=generator), logit_mean, logit_std)
    if sampling not in SAMPLINGS:
        raise UserError(f"sigma sampling {sampling!r}: allowed {', '.join(SAMPLINGS)}")
    return from_uniform(sampling, torch.rand(size=(n,), device=device, generator=generator), mode_scale)


def draw_sigmas(draw: SigmaDraw, n: int, generator: torch.Generator, scheduler_config=None,
                device="cpu") -> torch.Tensor:
    """A step's sigmas, shape (n,): a draw from `draw.sampling`, shifted (`draw.shift`, or the scheduler config's),
    then mapped linearly into `draw.sigma_range` (as kohya maps into [min_timestep, max_timestep] after its shift).
    Raises UserError for an unknown sampling, a range outside [0, 1], or no shift and no scheduler config."""
    lo, hi = draw.sigma_range
    if not 0.0 <= lo < hi <= 1.0:
        raise UserError(f"sigma range {draw.sigma_range}: needs 0 <= low < high <= 1")
    shift = draw.shift
    if shift is None:
        if scheduler_config is None:
            raise UserError("flow-matching shift: none given and no scheduler config to read it from")
        shift = shift_from_scheduler_config(scheduler_config)
    u = draw_density(draw.sampling, n, generator, draw.logit_mean, draw.logit_std, draw.mode_scale, device)
    return lo + (hi - lo) * shift_sigmas(u, shift)


def draw_noise(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise with `like`'s shape, dtype and device, from `generator` (on `like`'s device)."""
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


def _per_example(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """`(1 - sigma) * x0 + sigma * noise`; x0, noise (B, C, H, W), sigma (B,). Equals
    FlowMatchEulerDiscreteScheduler.scale_noise at the same sigma (tested)."""
    s = _per_example(sigma, x0)
    return (1.0 - s) * x0 + s * noise


def transformer_timestep(sigma: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The `timestep` argument SD3Transformer2DModel receives: `sigma * num_train_timesteps`, a float in
    [0, num_train_timesteps], as FlowMatchEulerDiscreteScheduler's `timesteps` are (tested)."""
    return sigma * num_train_timesteps


def training_target(kind: str, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the (possibly preconditioned) model output is compared with: "velocity": `noise - x0`; "x0": `x0`.
    Raises UserError for another kind."""
    if kind == "velocity":
        return noise - x0
    if kind == "x0":
        return x0
    raise UserError(f"flow-matching target {kind!r}: allowed {', '.join(TARGETS)}")


def model_output(kind: str, pred: torch.Tensor, noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The transformer's output as compared with `training_target(kind, ...)`: "velocity": `pred` unchanged; "x0":
    the preconditioned `x0_hat = pred * (-sigma) + x_t` (diffusers' SD3 script, kohya's sd3_train_network)."""
    if kind == "velocity":
        return pred
    if kind == "x0":
        return pred * (-_per_example(sigma, pred)) + noisy
    raise UserError(f"flow-matching target {kind!r}: allowed {', '.join(TARGETS)}")


def loss_weight(weighting: str, sigma: torch.Tensor) -> torch.Tensor:
    """Per-example loss weight, shape of `sigma`, float32: "none" 1, "sigma_sqrt" `sigma**-2`, "cosmap"
    `2 / (pi (1 - 2 sigma + 2 sigma**2))`; equal to diffusers' `compute_loss_weighting_for_sd3` (tested).
    Raises UserError for another name."""
    sigma = sigma.float()
    if weighting == "none":
        return torch.ones_like(sigma)
    if weighting == "sigma_sqrt":
        return sigma ** -2.0
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma ** 2))
    raise UserError(f"flow-matching loss weighting {weighting!r}: allowed {', '.join(WEIGHTINGS)}")
