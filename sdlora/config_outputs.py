"""The config sections of what a run writes besides the adapter's training: samples (`sample.*`), the validation
loss (`validation.*`), checkpoints, the export's options and the logs. Part of the schema in config.py, which
re-exports them."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from sdlora.config_base import Section, UserPath, no_blank


# --------------------------------------------------------------------------------------------- sample
class SamplePromptConfig(Section):
    prompt: str = Field(..., description="The prompt of this sample.")
    negative_prompt: Optional[str] = Field(None, description="Its negative prompt (default sample.negative_prompt).")
    width: Optional[int] = Field(None, ge=64, multiple_of=8, description="Its width (default sample.width).")
    height: Optional[int] = Field(None, ge=64, multiple_of=8, description="Its height (default sample.height).")
    seed: Optional[int] = Field(None, ge=0, description="Its seed (default sample.seed).")
    guidance_scale: Optional[float] = Field(None, ge=0.0, description="Its classifier-free guidance scale (default sample.guidance_scale).")
    num_inference_steps: Optional[int] = Field(None, ge=1, le=1000, description="Its denoising steps (default sample.num_inference_steps).")

    @model_validator(mode="after")
    def _not_blank(self) -> "SamplePromptConfig":
        if not self.prompt.strip():
            raise ValueError("prompt is blank (every sample needs text)")
        return self


class SkipLayerGuidanceConfig(Section):
    layers: list[int] = Field(default_factory=lambda: [7, 8, 9], min_length=1, description="Joint blocks skipped in the extra guidance pass (StableDiffusion3Pipeline's skip_guidance_layers; Stability's recommendation for SD3.5 Medium: 7, 8, 9).")
    scale: float = Field(2.8, ge=0.0, description="Skip-layer guidance scale (the pipeline's skip_layer_guidance_scale).")
    start: float = Field(0.01, ge=0.0, le=1.0, description="Fraction of the sampling steps where it starts (skip_layer_guidance_start).")
    stop: float = Field(0.2, ge=0.0, le=1.0, description="Fraction of the sampling steps where it stops (skip_layer_guidance_stop).")

    @model_validator(mode="after")
    def _window(self) -> "SkipLayerGuidanceConfig":
        if self.start >= self.stop:
            raise ValueError(f"sample.skip_layer_guidance: start {self.start} must be below stop {self.stop}")
        if min(self.layers) < 0 or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"sample.skip_layer_guidance.layers: {self.layers}; allowed: distinct block indices >= 0")
        return self


class SampleConfig(Section):
    prompts: list[str] = Field(default_factory=list, description="Prompts sampled during training, each with the settings below.")
    entries: list[SamplePromptConfig] = Field(default_factory=list, description="Prompts with their own settings: each a mapping with prompt and any of negative_prompt, width, height, seed, guidance_scale, num_inference_steps (unset ones: the sample.* value); sampled after sample.prompts.")
    prompts_file: Optional[UserPath] = Field(None, description="A prompt file in kohya's format (docs/training.md): one prompt a line, options --n negative prompt, --w width, --h height, --d seed, --l guidance scale, --s steps; # starts a comment; sampled after sample.entries.")
    every_steps: int = Field(0, ge=0, description="Sample every N steps (0 = off).")
    num_inference_steps: int = Field(20, ge=1, description="Denoising steps per sample.")
    guidance_scale: float = Field(7.0, ge=0.0, description="Classifier-free guidance scale.")
    guidance_rescale: Optional[float] = Field(None, ge=0.0, le=1.0, description="Guidance rescale phi (Lin et al. 2023, against over-exposure); default 0.7 with zero terminal SNR (model.zero_terminal_snr), else 0 (off).")
    seed: int = Field(0, ge=0, description="Sampling seed (the same for every sample step).")
    negative_prompt: str = Field("", description="Negative prompt.")
    width: Optional[int] = Field(None, ge=64, multiple_of=8, description="Sample width (default: the largest base resolution, data.resolution).")
    height: Optional[int] = Field(None, ge=64, multiple_of=8, description="Sample height (default: the largest base resolution, data.resolution).")
    skip_layer_guidance: Optional[SkipLayerGuidanceConfig] = Field(None, description="SD3 / SD3.5 only: skip-layer guidance in the samples (the pipeline's extra guidance by the prediction with some joint blocks skipped, made for SD3.5 Medium); {} takes Stability's settings. Off when unset.")

    def has_prompts(self) -> bool:
        return bool(self.prompts or self.entries or self.prompts_file)

    @model_validator(mode="after")
    def _prompts_when_on(self) -> "SampleConfig":
        if self.every_steps and not self.has_prompts():
            raise ValueError("sample.every_steps is set but there are no prompts (give sample.prompts, sample.entries "
                             "or sample.prompts_file, or every_steps: 0)")
        no_blank(self.prompts, "sample.prompts")
        return self


# ------------------------------------------------------------------------------------------ validation
class ValidationConfig(Section):
    every_steps: int = Field(0, ge=0, description="Compute the validation loss every N steps and at the last (0 = off); logged as validation/loss to metrics.jsonl and the tracker.")
    path: Optional[UserPath] = Field(None, description="Folder of held-out images with captions (read like data.path).")
    num_images: int = Field(0, ge=0, description="Instead of a folder: hold this many images of the dataset out of training (a pick seeded by validation.seed).")
    timesteps: int = Field(4, ge=1, description="Fixed timesteps per image, spread evenly over the training range.")
    seed: int = Field(0, ge=0, description="Seed of the fixed noise (and of the held-out pick).")
    with_probe: bool = Field(False, description="Also run the drift probe at validation steps.")
    with_samples: bool = Field(False, description="Also write samples (sample.prompts, entries, prompts_file) at validation steps.")

    @model_validator(mode="after")
    def _one_source(self) -> "ValidationConfig":
        if self.every_steps and (self.path is None) == (self.num_images == 0):
            raise ValueError("validation.every_steps needs exactly one of validation.path (a folder) or "
                             "validation.num_images (held out of the dataset)")
        return self


# ----------------------------------------------------------------------------------------- checkpoint
class CheckpointConfig(Section):
    every_steps: int = Field(0, ge=0, description="Save a resumable checkpoint every N steps (0 = only at the end).")
    keep_last: int = Field(3, ge=1, description="Checkpoints kept; older ones are removed.")
    keep_adapters: bool = Field(False, description="Also keep every checkpoint's adapter, in both layouts, as <output.dir>/adapters/step_NNNNNN.safetensors and step_NNNNNN_kohya.safetensors, when older checkpoints (optimiser state and all) are removed: pick the step where the concept is learned and the rest still kept (docs/quality.md, long runs). Never pruned; --overwrite clears them with the rest of the old run.")


class ExportConfig(Section):
    reduce_rank: bool = Field(False, description="Truncate exports above the trained rank r (offset inits: 2r; lora.merge_every: grows by r per merge) back to rank r by SVD (reports the error and the share kept).")
    dtype: Literal["fp32", "fp16", "bf16"] = Field("fp32", description="dtype of the exported adapter.")
    fisher_samples: int = Field(0, ge=0, description="At the end of training, estimate the adapter's row Fisher over this many single-image gradients of the run's own data and store it in adapter.safetensors (sdlora.fisher metadata) for `sdlora merge --method fisher` / `resize --fisher` (0 = off; 32 is a reasonable start; costs one forward and backward pass each).")


class LogConfig(Section):
    tracker: Literal["tensorboard", "wandb", "none"] = Field("tensorboard", description="Experiment tracker (through Accelerate): TensorBoard files under <output.dir>/logs, Weights & Biases (project sdlora, run output.name; needs pip install 'sdlora[wandb]'), or none; metrics.jsonl is written either way.")
