"""The loaded parts of a base model, by part name, and which family they are."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdlora.model.families import ModelFamily


@dataclass
class Components:
    """Each of the family's parts (model/parts.py) loaded: `models` by part name (the denoiser, the text encoders,
    the VAE), `tokenizers_by_part` by text-encoder part name, the noise scheduler of training, and what was loaded.

    `unet`, `text_encoder`, `text_encoder_2`, `tokenizer`, `tokenizer_2` and `vae` are the SD families' parts by
    their old names (properties over `models`)."""

    family: ModelFamily
    models: dict[str, "torch.nn.Module"]
    tokenizers_by_part: dict[str, object]
    noise_scheduler: object  # the family's scheduler class, built from the model's scheduler config
    source: str  # what was loaded, for metadata

    def __post_init__(self):
        needed = {p.name for p in self.family.parts if not p.optional}
        allowed = {p.name for p in self.family.parts}
        if not needed <= set(self.models) <= allowed:
            raise ValueError(f"{self.family.title} components need the parts {sorted(needed)} (optional: "
                             f"{sorted(allowed - needed)}), got {sorted(self.models)}")

    # -- parts by role ----------------------------------------------------------------------------------------
    @property
    def denoiser(self) -> "torch.nn.Module":
        return self.models[self.family.denoiser.name]

    @property
    def text_encoders(self) -> dict[str, "torch.nn.Module"]:
        """The family's text encoders by part name (`text_encoder`, and `text_encoder_2` for SDXL), in the order the
        family's conditioning reads them; an optional part the model lacks (SD3's T5) is left out."""
        return {name: self.models[name] for name in self.family.text_encoders if name in self.models}

    @property
    def tokenizers(self) -> list:
        """One tokenizer per text encoder, in the same order."""
        return [self.tokenizers_by_part[name] for name in self.family.text_encoders if name in self.models]

    def adaptable(self) -> dict[str, "torch.nn.Module"]:
        """The models an adapter's modules live in, by part name (the denoiser, then the text encoders)."""
        return {name: self.models[name] for name in self.family.adaptable_parts if name in self.models}

    # -- the SD families' parts by their old names ------------------------------------------------------------
    @property
    def unet(self) -> "torch.nn.Module":
        return self.denoiser

    @property
    def vae(self) -> "torch.nn.Module":
        return self.models[self.family.vae.name]

    @vae.setter
    def vae(self, model: "torch.nn.Module") -> None:
        self.models[self.family.vae.name] = model

    @property
    def text_encoder(self) -> "torch.nn.Module":
        return self.models["text_encoder"]

    @property
    def text_encoder_2(self) -> "torch.nn.Module | None":
        return self.models.get("text_encoder_2")

    @property
    def tokenizer(self):
        return self.tokenizers_by_part["text_encoder"]

    @property
    def tokenizer_2(self):
        return self.tokenizers_by_part.get("text_encoder_2")

    # -- the noise schedule ------------------------------------------------------------------------------------
    @property
    def zero_terminal_snr(self) -> bool:
        """Whether the noise schedule is rescaled to zero terminal SNR (model.zero_terminal_snr; model/schedule.py)."""
        from sdlora.model.schedule import zero_terminal_snr_of

        return zero_terminal_snr_of(self.noise_scheduler)

    @property
    def prediction_type(self) -> str:
        """The training target: `epsilon` or `v_prediction` (the noise scheduler's, after model.prediction_type);
        `flow` for a rectified-flow scheduler (SD3), whose config has no prediction type."""
        return self.noise_scheduler.config.get("prediction_type") or "flow"

    @property
    def base_model_version(self) -> str:
        """kohya's name for (family, prediction type): sd_v1 | sd_v2 | sd_v2_v."""
        return self.family.base_model_version(self.prediction_type)
