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
    text_encoder_2: "torch.nn.Module | None" = None  # SDXL's OpenCLIP bigG (CLIPTextModelWithProjection)
    tokenizer_2: object = None  # SDXL's second tokenizer (pads with "!")

    @property
    def text_encoders(self) -> dict[str, "torch.nn.Module"]:
        """The family's text encoders by component name (`text_encoder`, and `text_encoder_2` for SDXL), in the
        order the family's conditioning reads them."""
        parts = {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}
        return {name: parts[name] for name in self.family.text_encoders}

    @property
    def tokenizers(self) -> list:
        """One tokenizer per text encoder, in the same order."""
        parts = {"text_encoder": self.tokenizer, "text_encoder_2": self.tokenizer_2}
        return [parts[name] for name in self.family.text_encoders]

    def adaptable(self) -> dict[str, "torch.nn.Module"]:
        """The models an adapter's modules live in, by component name (`unet`, then the text encoders)."""
        return {"unet": self.unet, **self.text_encoders}

    @property
    def zero_terminal_snr(self) -> bool:
        """Whether the noise schedule is rescaled to zero terminal SNR (model.zero_terminal_snr; model/schedule.py)."""
        from sdlora.model.schedule import zero_terminal_snr_of

        return zero_terminal_snr_of(self.noise_scheduler)

    @property
    def prediction_type(self) -> str:
        """The training target: `epsilon` or `v_prediction` (the noise scheduler's, after model.prediction_type)."""
        return self.noise_scheduler.config.prediction_type

    @property
    def base_model_version(self) -> str:
        """kohya's name for (family, prediction type): sd_v1 | sd_v2 | sd_v2_v."""
        return self.family.base_model_version(self.prediction_type)
