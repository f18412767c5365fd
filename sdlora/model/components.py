"""The loaded parts of a base model, and which family they are."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdlora.model.families import SD1, ModelFamily


@dataclass
class Components:
    unet: "torch.nn.Module"
    vae: "torch.nn.Module"
    text_encoder: "torch.nn.Module"
    tokenizer: object
    noise_scheduler: object  # DDPMScheduler built from the model's scheduler config
    source: str  # what was loaded, for metadata
    family: ModelFamily = SD1

    @property
    def prediction_type(self) -> str:
        """The training target: `epsilon` or `v_prediction` (the noise scheduler's, after model.prediction_type)."""
        return self.noise_scheduler.config.prediction_type

    @property
    def base_model_version(self) -> str:
        """kohya's name for (family, prediction type): sd_v1 | sd_v2 | sd_v2_v."""
        return self.family.base_model_version(self.prediction_type)
