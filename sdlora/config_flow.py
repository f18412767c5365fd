"""The rectified-flow keys of the loss section (`loss.flow.*`): how an SD3 / SD3.5 step draws its sigmas, what it
compares the transformer's output with and how it weighs each example (model/flow_matching.py has the maths).
Part of the schema in config.py; a DDPM model (SD 1.x, 2.x, SDXL) refuses them (ModelFamily.check_config)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from sdlora.config_base import Section


class FlowConfig(Section):
    timestep_sampling: Literal["logit_normal", "uniform", "mode", "cosmap"] = Field("logit_normal", description="How each example's sigma is drawn before the shift: logit_normal (sigmoid of a normal with loss.flow.logit_mean / logit_std; the SD3 paper's and diffusers' default), uniform (kohya's default), mode (the paper's f_mode with loss.flow.mode_scale) or cosmap (the paper's cosine map).")
    logit_mean: float = Field(0.0, description="Mean of the logit-normal draw (positive: noisier sigmas).")
    logit_std: float = Field(1.0, gt=0.0, description="Standard deviation of the logit-normal draw.")
    mode_scale: float = Field(1.29, description="Scale of the mode draw (diffusers' script default 1.29).")
    shift: Optional[float] = Field(None, gt=0.0, description="Sigma shift s: sigma' = s·sigma / (1 + (s - 1)·sigma) (the paper's resolution shift; kohya's training_shift). Default: the model's scheduler config (SD3 / SD3.5: 3.0).")
    target: Literal["velocity", "x0"] = Field("velocity", description="velocity: the transformer's output against noise - x0 (the SD3 paper; SimpleTuner; diffusers' script with --precondition_outputs 0); x0: the output preconditioned to x0_hat = x_t - sigma·output and compared with x0 (diffusers' script default and kohya; for MSE the velocity loss times sigma²).")
    weighting: Literal["none", "sigma_sqrt", "cosmap"] = Field("none", description="Per-example loss weight (diffusers' compute_loss_weighting_for_sd3): none, sigma_sqrt (sigma⁻²) or cosmap (2 / (pi·(1 - 2·sigma + 2·sigma²))).")
    min_sigma: float = Field(0.0, ge=0.0, le=1.0, description="Smallest training sigma: drawn sigmas are mapped onto [min_sigma, max_sigma].")
    max_sigma: float = Field(1.0, ge=0.0, le=1.0, description="Largest training sigma.")

    @model_validator(mode="after")
    def _range(self) -> "FlowConfig":
        if self.min_sigma >= self.max_sigma:
            raise ValueError(f"loss.flow.min_sigma ({self.min_sigma}) must be < loss.flow.max_sigma ({self.max_sigma})")
        return self
