"""The regularisation sections of the config (`reg.*`): the embedding-norm penalty (its weight per text output of
the model family), output preservation and the drift probe. Part of the schema in config.py, which re-exports them."""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import Field, model_validator

from sdlora.config_base import Section, UserPath, no_blank
from sdlora.errors import UserError

Weight = Annotated[float, Field(ge=0.0)]


class EmbeddingNormConfig(Section):
    weight: float = Field(0.0, ge=0.0, description="Penalty weight (0 = off) of each text encoder's tokens not in reg.embedding_norm.output_weights (SD 1.x/2.x: the one text output).")
    output_weights: dict[str, Weight] = Field(default_factory=dict, description="Penalty weight of one text output the denoiser reads, by the model family's name for it (text_encoder; SDXL also text_encoder_2, bigG's tokens, and pooled, bigG's pooled embedding; SD3 also text_encoder_3, T5's tokens, and pooled_l / pooled, CLIP-L's and CLIP-G's halves of the pooled vector), e.g. {text_encoder_2: 0.01, pooled: 0.01}; an output not listed: reg.embedding_norm.weight for an encoder's tokens, the weight of its encoder's tokens for a pooled embedding. A name that is no text output of the model is an error before training.")
    text_encoder_2_weight: Optional[float] = Field(None, ge=0.0, description="Kept for existing configs: the same as reg.embedding_norm.output_weights.text_encoder_2 (SDXL's bigG tokens).")
    pooled_weight: Optional[float] = Field(None, ge=0.0, description="Kept for existing configs: the same as reg.embedding_norm.output_weights.pooled (SDXL's pooled embedding).")
    norm: Literal["l2", "l1"] = Field("l2", description="Vector norm of each token embedding.")
    tokens: Literal["all", "content"] = Field("all", description="All positions, or up to and including the end-of-text token.")
    reduce: Literal["per_token", "mean"] = Field("per_token", description="mean_t |‖E_t‖-‖E0_t‖| (per_token) or |mean_t ‖E_t‖ - mean_t ‖E0_t‖| (mean).")
    cache_size: int = Field(4096, ge=0, description="Distinct captions whose base norms (base embeddings, with the direction term) are kept in memory (LRU).")
    direction_weight: float = Field(0.0, ge=0.0, description="Weight of the direction term mean_t (1 - cos(E_t, E0_t)) (0 = off; docs/embedding-norm.md).")
    direction_prompts: Literal["batch", "pinned", "both"] = Field("batch", description="Which text the direction term holds: the batch's captions, reg.embedding_norm.pinned_prompts (one more text-encoder pass per step), or both (the mean of the two).")
    pinned_prompts: list[str] = Field(default_factory=list, description="Prompts (or terms) whose embedding direction is held when direction_prompts is pinned or both.")

    def given_weights(self) -> dict[str, float]:
        """output_weights with the keys kept for existing configs folded in (text_encoder_2_weight, pooled_weight)."""
        legacy = {"text_encoder_2": self.text_encoder_2_weight, "pooled": self.pooled_weight}
        return {**{k: v for k, v in legacy.items() if v is not None}, **self.output_weights}

    def weight_of(self, output: str, family) -> float:
        """The penalty weight of one of `family`'s text outputs (`ModelFamily.text_outputs`: SD 1.x/2.x
        `text_encoder`; SDXL `text_encoder`, `text_encoder_2`, `pooled`): output_weights' entry, else for an
        encoder's tokens reg.embedding_norm.weight, for a pooled embedding (named apart from its encoder) the weight
        of its encoder's tokens."""
        given = self.given_weights()
        if output in given:
            return given[output]
        encoder = next(e for name, e, _ in family.text_outputs if name == output)
        return self.weight if encoder == output else self.weight_of(encoder, family)

    def check_outputs(self, family) -> None:
        """A UserError naming an output_weights key that is none of `family`'s text outputs."""
        outputs = [name for name, _, _ in family.text_outputs]
        for name in self.given_weights():
            if name not in outputs:
                raise UserError(f"reg.embedding_norm.output_weights.{name}: {family.title} has no text output "
                                f"{name!r} (its outputs: {', '.join(outputs)})")

    @model_validator(mode="after")
    def _pinned(self) -> "EmbeddingNormConfig":
        for output in ("text_encoder_2", "pooled"):
            if getattr(self, f"{output}_weight") is not None and output in self.output_weights:
                raise ValueError(f"reg.embedding_norm.{output}_weight and reg.embedding_norm.output_weights.{output} "
                                 "are the same key; give one")
        if self.direction_weight and self.direction_prompts != "batch" and not self.pinned_prompts:
            raise ValueError(f"reg.embedding_norm.direction_prompts={self.direction_prompts} needs "
                             "reg.embedding_norm.pinned_prompts")
        no_blank(self.pinned_prompts, "reg.embedding_norm.pinned_prompts")
        return self


class PreservationConfig(Section):
    weight: float = Field(0.0, ge=0.0, description="Output preservation without a regularisation set (0 = off; docs/training.md): weight · MSE(adapted prediction, base prediction) on preservation prompts, with the step's noisy latents and timesteps; the base prediction has every adapter (UNet and text encoder) disabled.")
    source: Literal["empty", "prompts", "file", "captions"] = Field("empty", description="Preservation prompts: the empty prompt, reg.preservation.prompts, one prompt per line of reg.preservation.prompts_file, or the dataset's captions with reg.preservation.trigger_words removed.")
    prompts: list[str] = Field(default_factory=list, description="The prompts of source=prompts (text unrelated to what is trained, e.g. class words).")
    prompts_file: Optional[UserPath] = Field(None, description="A UTF-8 text file, one prompt per line (blank lines skipped), for source=file.")
    trigger_words: list[str] = Field(default_factory=list, description="Words removed from the dataset's captions for source=captions (whole words, case-sensitive; a tag left empty is dropped).")
    every_steps: int = Field(1, ge=1, description="Add the term every N steps (each time: a UNet forward without gradient, one with, and their text-encoder passes).")

    @model_validator(mode="after")
    def _source(self) -> "PreservationConfig":
        needs = {"prompts": ("prompts", self.prompts), "file": ("prompts_file", self.prompts_file),
                 "captions": ("trigger_words", self.trigger_words)}
        for source, (key, value) in needs.items():
            if self.source == source and not value:
                raise ValueError(f"reg.preservation.source={source} needs reg.preservation.{key}")
            if self.source != source and value:
                raise ValueError(f"reg.preservation.{key} is set but reg.preservation.source is {self.source} "
                                 f"(set source: {source}, or drop {key})")
        no_blank(self.prompts, "reg.preservation.prompts")
        no_blank(self.trigger_words, "reg.preservation.trigger_words")
        return self


class RegConfig(Section):
    embedding_norm: EmbeddingNormConfig = Field(default_factory=EmbeddingNormConfig)
    preservation: PreservationConfig = Field(default_factory=PreservationConfig)
    probe_prompts: Optional[list[str]] = Field(None, description="Prompts of the drift probe (default: a built-in list of everyday prompts).")
    probe_every: int = Field(0, ge=0, description="Run the drift probe every N steps (0 = only at the end).")

    @model_validator(mode="after")
    def _probe_prompts(self) -> "RegConfig":
        if self.probe_prompts is not None:
            if not self.probe_prompts:
                raise ValueError("reg.probe_prompts is an empty list (give prompts, or leave it unset for the built-in list)")
            no_blank(self.probe_prompts, "reg.probe_prompts")
        return self
