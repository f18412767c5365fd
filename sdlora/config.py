"""The config schema and its validation (reading files and `--set` overrides: config_file.py).

Every key is declared here, with its type, range and default; the field descriptions are the reference
documentation (`sdlora config-help` prints them). A config is validated before any model loads: an
unknown key, a wrong type or an out-of-range value is a `UserError` naming the full key path.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import AfterValidator, BeforeValidator, Field, ValidationError, model_validator

from sdlora.config_file import apply_overrides, read_config_file
from sdlora.config_help import describe_error, describe_model
from sdlora.config_outputs import (CheckpointConfig, ExportConfig, LogConfig, SampleConfig,  # noqa: F401 (re-exported)
                                   SamplePromptConfig, ValidationConfig)
from sdlora.config_base import Section, UserPath
from sdlora.config_loss import LossConfig
from sdlora.data.buckets import resolution_list
from sdlora.config_reg import EmbeddingNormConfig, PreservationConfig, RegConfig  # noqa: F401 (re-exported)
from sdlora.errors import UserError


# ---------------------------------------------------------------------------------------------- model
class ModelConfig(Section):
    path: UserPath = Field(..., description="Base model: a diffusers folder or a single-file .safetensors/.ckpt checkpoint.")
    vae_path: Optional[UserPath] = Field(None, description="Swap in this VAE (diffusers folder or single file).")
    config_dir: Optional[UserPath] = Field(None, description="Diffusers-format configs to use for a single-file checkpoint instead of the bundled ones.")
    text_encoders_path: Optional[UserPath] = Field(None, description="For an SD3 / SD3.5 single-file model.path: a diffusers SD3 / SD3.5 folder (StableDiffusion3Pipeline layout) whose text_encoder, text_encoder_2 and text_encoder_3 (with their tokenizers) stand in for those the file lacks (sd3.5_large.safetensors holds none); the file's own encoders are kept. Also where T5's tokenizer (tokenizer_3) comes from when the file holds T5. Refused with any other model.path.")
    allow_pickle: bool = Field(False, description="Allow loading .ckpt (pickle) files, which can run arbitrary code.")
    prediction_type: Optional[Literal["epsilon", "v_prediction"]] = Field(None, description="What the UNet predicts, when the model does not say it right (e.g. a v-prediction checkpoint without metadata); default: the model's scheduler config, the file's metadata or v_pred key, or the SD 2.x heuristic.")
    base_precision: Literal["full", "fp8", "int8", "int4"] = Field("full", description="How the frozen denoiser's and text encoders' Linear and Conv2d weights are stored: full (the training dtype, train.mixed_precision), fp8 (float8_e4m3fn, as kohya's --fp8_base), int8 or int4 (optimum-quanto: pip install 'sdlora[quant]'); each layer is upcast to the training dtype in its forward and backward. Adapters, norms, embeddings and the VAE keep their dtype (docs/training.md).")
    zero_terminal_snr: Optional[bool] = Field(None, description="Rescale the noise schedule to zero terminal SNR (Lin et al. 2023; diffusers' rescale_betas_zero_snr), for v-prediction models trained that way (e.g. v-prediction SDXL fine-tunes); needs v-prediction. Sampling then uses trailing timesteps and sample.guidance_rescale 0.7. Default: what the model says (its scheduler config's rescale_betas_zero_snr, an SDXL file's ztsnr key).")

    @model_validator(mode="after")
    def _zero_snr_needs_v(self) -> "ModelConfig":
        if self.zero_terminal_snr and self.prediction_type == "epsilon":
            raise ValueError("model.zero_terminal_snr needs v-prediction (at zero SNR an epsilon model cannot learn "
                             "anything); set model.prediction_type: v_prediction")
        return self


# ----------------------------------------------------------------------------------------------- data

class CaptionOptions(Section):
    caption_extension: str = Field(".txt", description="Caption file extension beside each image (.txt or .caption).")
    shuffle_tags: bool = Field(False, description="Shuffle comma-separated tags each time a caption is used.")
    keep_tokens: int = Field(0, ge=0, description="Number of leading tags kept in place when shuffling or dropping tags.")
    caption_dropout: float = Field(0.0, ge=0.0, le=1.0, description="Probability of replacing the whole caption by the empty string.")
    tag_dropout: float = Field(0.0, ge=0.0, le=1.0, description="Probability of dropping each tag (after keep_tokens).")
    prefix: str = Field("", description="Text put before every caption.")
    suffix: str = Field("", description="Text put after every caption.")
    multiline_captions: bool = Field(False, description="A caption of several lines (a .txt with line breaks, a metadata.jsonl text with \\n) holds several captions of the image: one line is drawn each time the image is used, from the run's seed (off: the lines are joined with spaces, one caption).")
    wildcards: bool = Field(False, description="{a|b|c} in a caption becomes one of a, b, c, drawn for each image once per epoch from the run's seed (kohya's enable_wildcard); {{ and }} are literal braces.")

    @model_validator(mode="after")
    def _caption_extension(self) -> "CaptionOptions":
        ext = self.caption_extension.lower()
        ext = ext if ext.startswith(".") else "." + ext
        if ext == "." or "/" in ext or "\\" in ext:
            raise ValueError(f"caption_extension {self.caption_extension!r} is not a file extension (e.g. .txt, .caption)")
        from sdlora.data.images import IMAGE_EXTENSIONS

        if ext in IMAGE_EXTENSIONS or ext == ".jsonl":
            raise ValueError(f"caption_extension {self.caption_extension!r} is an image or metadata extension "
                             "(captions are text files such as .txt or .caption)")
        return self


RESOLUTION_RANGE = (32, 4096)


def _check_resolutions(value):
    """A base resolution or a non-empty list of distinct ones, each a multiple of 8 (the VAE's pixels per latent cell)
    in RESOLUTION_RANGE; ValueError names the first wrong one."""
    sizes = value if isinstance(value, list) else [value]
    if not sizes:
        raise ValueError("an empty list: give one base resolution (512) or several ([512, 768])")
    lo, hi = RESOLUTION_RANGE
    for r in sizes:
        if not lo <= r <= hi or r % 8:
            raise ValueError(f"{r} is not a base resolution (allowed: multiples of 8 from {lo} to {hi}; the VAE has "
                             "8 pixels per latent cell)")
    if len(set(sizes)) < len(sizes):
        raise ValueError(f"{next(r for r in sizes if sizes.count(r) > 1)} is listed twice")
    return value


def _resolutions_form(value):
    """A whole number or a list of them (as int, as before, "512" and 512.0 too; no bools), else one ValueError
    for the key (not one per branch of the union)."""
    def whole(v):
        if isinstance(v, str) and v.strip().isdigit():
            return int(v)
        if isinstance(v, float) and v.is_integer():
            return int(v)
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    if whole(value) is not None:
        return whole(value)
    if isinstance(value, list) and all(whole(v) is not None for v in value):
        return [whole(v) for v in value]
    raise ValueError(f"got {value!r}: give a base resolution (512) or a list of them ([512, 768]), whole pixels")


# data.resolution and a subset's resolution: one base resolution, or a list of them (several resolutions in one run).
Resolutions = Annotated[Union[int, list[int]], BeforeValidator(_resolutions_form), AfterValidator(_check_resolutions)]


class SubsetConfig(CaptionOptions):
    path: UserPath = Field(..., description="Folder of images (with captions), a kohya-style parent folder, or a folder with metadata.jsonl.")
    repeats: int = Field(1, ge=1, description="How many times each image appears per epoch (kohya folder prefixes override this).")
    is_regularization: bool = Field(False, description="Prior-preservation images; their loss is weighted by data.prior_loss_weight.")
    class_caption: Optional[str] = Field(None, description="Caption for images without one (default: the kohya folder name).")
    resolution: Optional[Resolutions] = Field(None, description="This subset's base resolution, or a list of them (as data.resolution; default: data.resolution): its images are bucketed at each (kohya's per-dataset resolution).")


class DataConfig(CaptionOptions):
    path: Optional[UserPath] = Field(None, description="A single image folder; shorthand for one entry in data.subsets.")
    subsets: list[SubsetConfig] = Field(default_factory=list, description="Several data sources, each with its own repeats and caption options.")
    resolution: Resolutions = Field(512, description="Base resolution, or a list of them ([512, 768, 1024]: several resolutions in one run): each image is bucketed at each, the bucket area budget being resolution²; each batch holds one bucket, so one size (docs/data.md). Multiples of 8 from 32 to 4096.")
    bucketing: bool = Field(True, description="Aspect-ratio bucketing; when false every image is resized and cropped to resolution².")
    bucket_step: int = Field(64, ge=8, multiple_of=8, description="Bucket sides are multiples of this.")
    min_side: int = Field(256, ge=64, description="Smallest bucket side (lowered to data.resolution when larger, so the square bucket always exists).")
    max_side: int = Field(1024, ge=64, description="Largest bucket side.")
    no_upscale: bool = Field(False, description="Never upscale: an image goes to a bucket no larger than itself.")
    crop: Literal["center", "random"] = Field("center", description="How an image is cropped to its bucket.")
    flip: bool = Field(False, description="Random horizontal flip.")
    prior_loss_weight: float = Field(1.0, ge=0.0, description="Loss weight of regularisation-subset images.")
    cache_latents: Literal["none", "memory", "disk"] = Field("none", description="Cache VAE latents: not at all, in memory, or on disk (safetensors keyed by image content hash, crop and VAE identity). Needs data.crop=center.")
    cache_dir: Optional[UserPath] = Field(None, description="Disk latent cache folder (default: <output.dir>/../.sdlora-cache).")
    cache_text_encoder_outputs: bool = Field(True, description="Cache text-encoder outputs when the text encoder is frozen.")
    text_cache_mb: float = Field(2048, gt=0, description="The text-encoder output cache's budget in MiB (the cached tensors' bytes; also at most 2048 captions), least recently used captions dropped past it: SD3's conditioning is 5.2 MiB per caption in fp32 (T5 at 256 tokens), SD 1.5's 0.23 MiB.")
    on_error: Literal["skip", "fail"] = Field("skip", description="A broken image or caption: skip it (listed at start) or stop before training naming the first bad file (docs/data.md has the table).")
    min_image_side: int = Field(64, ge=1, description="Images with a side smaller than this are treated as bad data.")
    max_image_pixels: int = Field(178_956_970, ge=1, description="Images larger than this many pixels are refused (decompression-bomb guard).")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    max_token_length: Literal[75, 150, 225] = Field(75, description="Caption tokens the text encoder sees: 75 (one CLIP window, as always), or 150/225: the caption cut in 75-token chunks, each with its own start/end tokens, encoded apart and concatenated (AUTOMATIC1111's layout; docs/data.md).")
    masked_loss: bool = Field(False, description="Weight the diffusion loss by a per-image mask (docs/data.md): a same-name file in data.mask_dir, else the image's alpha channel, else 1 everywhere; resized and cropped with the image, averaged per latent cell.")
    mask_dir: Optional[UserPath] = Field(None, description="Folder of loss masks named like the images (cat.jpg -> cat.png; white = 1, black = 0). Needs data.masked_loss.")

    @model_validator(mode="after")
    def _one_source(self) -> "DataConfig":
        if self.path is None and not self.subsets:
            raise ValueError("data.path or data.subsets is required")
        if self.path is not None and self.subsets:
            raise ValueError("data.path and data.subsets are both set; give one (data.path is shorthand for a "
                             "one-entry data.subsets)")
        if self.min_side > self.max_side:
            raise ValueError(f"data.min_side ({self.min_side}) must be <= data.max_side ({self.max_side})")
        if self.crop == "random" and self.cache_latents != "none":
            raise ValueError("data.crop=random cannot be combined with data.cache_latents (a cached latent fixes the "
                             "crop); use data.crop=center or data.cache_latents=none")
        from sdlora.data.buckets import bucket_sizes  # the table is pure config: a setting with no bucket fails here

        used = resolution_list(self.resolution) + [r for s in self.subsets if s.resolution is not None
                                                   for r in resolution_list(s.resolution)]
        try:
            for r in dict.fromkeys(used):
                bucket_sizes(self, r)
        except UserError as e:
            raise ValueError(str(e)) from None
        return self


# --------------------------------------------------------------------------------------------- output
class OutputConfig(Section):
    dir: UserPath = Field(..., description="Run folder: adapter, checkpoints, samples, logs and the resolved config go here.")
    name: str = Field("sdlora", description="Name written into the adapter metadata (ss_output_name).")


# ---------------------------------------------------------------------------------------------- train
class EmaConfig(Section):
    enabled: bool = Field(False, description="Keep an exponential moving average of the adapter weights, exported as adapter_ema.safetensors beside adapter.safetensors (and in every checkpoint).")
    decay: float = Field(0.999, gt=0.0, lt=1.0, description="ema = decay · ema + (1 − decay) · weights after each step (0.999 averages about the last 1000 steps).")
    start_step: int = Field(0, ge=0, description="Before this step the average just follows the weights.")
    device: Literal["same", "cpu"] = Field("same", description="Where the average lives: the training device, or the CPU (saves accelerator memory, costs a copy per step).")


class TrainConfig(Section):
    max_steps: int = Field(1000, ge=1, description="Optimiser steps to train.")
    batch_size: int = Field(1, ge=1, description="Images per step per process.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches accumulated per optimiser step.")
    seed: int = Field(0, ge=0, description="Seed for init, data order, noise and timesteps.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="Autocast precision; frozen weights are stored in this dtype, LoRA weights and alphas in fp32.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass to save memory.")
    channels_last: bool = Field(False, description="channels_last memory format for the UNet.")
    compile: bool = Field(False, description="torch.compile the UNet.")
    max_nonfinite_steps: int = Field(10, ge=1, description="Stop after this many consecutive steps with a non-finite loss (each is skipped).")
    log_every: int = Field(1, ge=1, description="Log scalars every N steps.")
    ema: EmaConfig = Field(default_factory=EmaConfig)


# ---------------------------------------------------------------------------------------------- optim
Rate = Annotated[float, Field(ge=0.0)]


class LrRule(Section):
    match: str = Field(..., description="A named group (text_encoder, text_encoder.layers.N, unet, unet.down, unet.mid, unet.up; SDXL also text_encoder_2, text_encoder_2.layers.N, unet.input, unet.middle, unet.output) or a regular expression searched in the module name.")
    lr: Optional[float] = Field(None, ge=0.0, description="Learning rate for the modules this rule matches.")
    lr_scale: Optional[float] = Field(None, ge=0.0, description="Factor on the part's base rate (optim.part_lr of the part, else optim.lr or optim.text_encoder_lr).")
    preset: Optional[Literal["match_full_finetune"]] = Field(None, description="A derived per-module rate (docs/lora.md, 'A rate rule from the full fine-tune'): match_full_finetune gives each module the rate at which its first Adam steps move W as much as a full fine-tune at rate lr (default: the part's base rate) would; lora.type lora only.")

    @model_validator(mode="after")
    def _exactly_one(self) -> "LrRule":
        if self.preset is not None:
            if self.lr_scale is not None:
                raise ValueError(f"rule {self.match!r}: preset {self.preset} takes lr (the full fine-tune's rate), not lr_scale")
        elif (self.lr is None) == (self.lr_scale is None):
            raise ValueError(f"rule {self.match!r} needs exactly one of lr, lr_scale or preset")
        return self


PRODIGY_LR = 1.0
PRODIGY_LR_RANGE = (0.1, 10.0)


class OptimConfig(Section):
    optimizer: Literal["adamw", "adamw8bit", "prodigy", "adafactor", "lion", "came", "adamw_schedulefree"] = Field("adamw", description="AdamW (torch, foreach/fused), 8-bit AdamW (bitsandbytes extra), Prodigy (prodigy extra), Adafactor (transformers'; a given rate, no relative step or parameter scaling), Lion, CAME or schedule-free AdamW (the optimizers extra: pytorch-optimizer); docs/training.md.")
    lr: float = Field(1e-4, ge=0.0, description="Learning rate of the UNet adapters (default 1e-4; 1.0 with prodigy, whose rate multiplies its own step-size estimate).")
    text_encoder_lr: Optional[float] = Field(None, ge=0.0, description="Learning rate of the text-encoder adapters (default: optim.lr).")
    part_lr: dict[str, Rate] = Field(default_factory=dict, description="Learning rate of one part's adapters, by the model family's part name (unet, text_encoder; SDXL also text_encoder_2, its OpenCLIP bigG), e.g. {text_encoder_2: 4.0e-5}; a part not listed trains at optim.lr (the denoiser) or optim.text_encoder_lr (a text encoder). A name that is no adapted part of the model is an error before training.")
    text_encoder_2_lr: Optional[float] = Field(None, ge=0.0, description="Kept for existing configs: the same as optim.part_lr.text_encoder_2 (SDXL's second text encoder, OpenCLIP bigG; default: optim.text_encoder_lr).")
    alpha_lr: Optional[float] = Field(None, ge=0.0, description="Learning rate of learnable alphas (default: the module's rate).")
    b_lr_ratio: float = Field(1.0, gt=0.0, description="B's rate = ratio x A's rate (LoRA+).")
    lr_rules: list[LrRule] = Field(default_factory=list, description="Ordered per-layer rate rules; first match wins; a rule matching nothing is an error.")
    scheduler: Literal["constant", "cosine", "linear"] = Field("constant", description="LR schedule after warm-up.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay (not applied to alphas).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas.")
    eps: float = Field(1e-8, gt=0.0, description="Adam (and Prodigy) epsilon.")
    max_grad_norm: Optional[float] = Field(1.0, gt=0.0, description="Clip the global gradient norm (null = off).")

    @model_validator(mode="before")
    @classmethod
    def _prodigy_default_lr(cls, data: Any) -> Any:
        # Prodigy estimates the step size itself; its lr is a multiplier on that estimate, about 1.0.
        if isinstance(data, dict) and data.get("optimizer") == "prodigy" and "lr" not in data:
            data = {**data, "lr": PRODIGY_LR}
        return data

    @model_validator(mode="after")
    def _schedule_free(self) -> "OptimConfig":
        if self.optimizer == "adamw_schedulefree" and self.scheduler != "constant":
            raise ValueError(f"optim.scheduler={self.scheduler} with optim.optimizer=adamw_schedulefree: schedule-free "
                             "AdamW replaces the schedule (use optim.scheduler: constant; optim.warmup_steps is its "
                             "own warm-up)")
        return self

    @model_validator(mode="after")
    def _ranges(self) -> "OptimConfig":
        for i, b in enumerate(self.betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"optim.betas: {b} is out of range (each beta must be in [0, 1))")
        if self.text_encoder_2_lr is not None and "text_encoder_2" in self.part_lr:
            raise ValueError("optim.text_encoder_2_lr and optim.part_lr.text_encoder_2 are the same key; give one")
        if self.optimizer == "prodigy":
            rates = [("optim.lr", self.lr), ("optim.text_encoder_lr", self.text_encoder_lr),
                     ("optim.text_encoder_2_lr", self.text_encoder_2_lr)]
            rates += [(f"optim.part_lr.{part}", lr) for part, lr in self.part_lr.items()]
            rates += [("optim.alpha_lr", self.alpha_lr)] + [(f"optim.lr_rules.{i}.lr", r.lr) for i, r in enumerate(self.lr_rules)]
            for key, lr in rates:
                if lr is not None and lr != 0 and not PRODIGY_LR_RANGE[0] <= lr <= PRODIGY_LR_RANGE[1]:
                    raise ValueError(f"{key}: {lr:g} with optim.optimizer=prodigy: Prodigy finds the step size itself "
                                     f"and the rate multiplies it (use about 1.0; allowed {PRODIGY_LR_RANGE[0]:g} to "
                                     f"{PRODIGY_LR_RANGE[1]:g}, or 0 to freeze)")
        return self


# ----------------------------------------------------------------------------------------------- lora
DEFAULT_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
DEFAULT_TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
DEFAULT_CONV_TARGETS = ["conv1", "conv2", "conv_shortcut", "proj_in", "proj_out", "downsamplers.0.conv", "upsamplers.0.conv"]


# The inits each LyCORIS kind allows (lora/init.py builds them; docs/lora.md). LoHa and LoKr start with ΔW = 0
# exactly (the output at step 0 is the base model's) and leave the base weight alone. `compensated` and `principal`
# do not apply to them: they offset the base by a non-zero start update, and the exported update ΔW - ΔW0 is then a
# difference of two Hadamard (Kronecker) products, which no single LoHa (LoKr) module holds, so the file could not
# reproduce the trained model. `orthogonal` applies to LoHa; a Kronecker product is zero only when a factor is, so
# for LoKr it would be the zero init under another name.
LYCORIS_INITS = {"loha": ("zero", "orthogonal"), "lokr": ("zero",)}


class LoraConfig(Section):
    type: Literal["lora", "dora", "loha", "lokr"] = Field("lora", description="Adapter kind (docs/lora.md): lora (low-rank W0 + s·B·A; linear and conv), dora (weight-decomposed: m ⊙ (W0 + s·B·A) / its norm per output feature, m trained at the module's rate), loha (LyCORIS' Hadamard product: W0 + s·(w1a·w1b) ⊙ (w2a·w2b); inits zero or orthogonal) or lokr (LyCORIS' Kronecker product: W0 + s·w1 ⊗ w2, w2 low-rank where rank < half its size; init zero).")
    rank: int = Field(16, ge=1, description="Rank r of Linear adapters.")
    alpha: float = Field(16.0, description="Initial alpha, not 0; scale = alpha / r (standard) or alpha / sqrt(r) (rank_stabilized).")
    unet_targets: list[str] = Field(default_factory=lambda: list(DEFAULT_UNET_TARGETS), description="UNet Linear modules to adapt: a name ending (to_q) or a regular expression (re:...).")
    text_encoder_targets: list[str] = Field(default_factory=lambda: list(DEFAULT_TEXT_ENCODER_TARGETS), description="Text-encoder Linear modules to adapt, same syntax.")
    conv: bool = Field(False, description="Also adapt UNet convolutions (and 1x1 proj_in/proj_out).")
    conv_targets: list[str] = Field(default_factory=lambda: list(DEFAULT_CONV_TARGETS), description="UNet Conv2d modules to adapt when lora.conv is on.")
    conv_rank: Optional[int] = Field(None, ge=1, description="Rank of conv adapters (default: lora.rank).")
    conv_alpha: Optional[float] = Field(None, description="Alpha of conv adapters, not 0 (default: lora.alpha).")
    learnable_alpha: bool = Field(False, description="Train each module's alpha (fp32, rate optim.alpha_lr).")
    init_alphas_from: Optional[UserPath] = Field(None, description="Start each module's alpha from this earlier sdlora adapter's learned alphas.")
    init_from: Optional[UserPath] = Field(None, description="Continue training this adapter file (diffusers or kohya layout): each of its modules starts from its factors, with its rank and alpha; modules the targets add and the file lacks start fresh.")
    scaling: Literal["standard", "rank_stabilized"] = Field("standard", description="alpha / r or alpha / sqrt(r).")
    init: Literal["zero", "orthogonal", "orthonormal", "compensated", "principal"] = Field("zero", description="Initialisation; every scheme leaves the model's output at step 0 unchanged (orthonormal: A's rows orthonormal, B = 0, the LoRA-FA setting of Shuttleworth et al. 2024 with lora.train_a false).")
    train_a: bool = Field(True, description="Train A; false trains only B (LoRA-FA; lora and dora).")
    merge_every: int = Field(0, ge=0, description="Periodic merging (ReLoRA, Lialin et al. 2023; lora.type lora, init zero or orthogonal): every N optimiser steps each adapter's update is added into its frozen base weight and the adapter restarts (init drawn again, its factors' optimiser state reset), so the total update can exceed rank r; the export holds the total (rank grows by r per merge; export.reduce_rank cuts it back). 0: off.")
    lokr_factor: int = Field(-1, ge=-1, description="lora.type lokr: how each dimension is split between w1 and w2 (LyCORIS' factor): -1 the divisor pair nearest the square root (320 -> 16 x 20), N > 0 a split with N on w1's side where N divides it (else the nearest pair with w1's part <= N).")

    @model_validator(mode="after")
    def _alpha_not_zero(self) -> "LoraConfig":
        # scale = alpha / r = 0: the adapter's output and every gradient reaching A and B (and a learnable
        # alpha, whose gradient is B·A·x with B·A = 0 at the start) are exactly zero: nothing would train.
        for key, value in (("alpha", self.alpha), ("conv_alpha", self.conv_alpha)):
            if value is not None and value == 0:
                raise ValueError(f"lora.{key}: 0 makes the adapter's scale alpha/r zero and nothing trains "
                                 f"(allowed: any non-zero number; alpha = rank gives scale 1)")
        if self.init_from and self.init_alphas_from:
            raise ValueError("lora.init_from takes each module's alpha from its file: drop lora.init_alphas_from")
        if self.type in LYCORIS_INITS and self.init not in LYCORIS_INITS[self.type]:
            why = ("its offset of the base by the start update would make the export a difference of two "
                   f"{'Hadamard' if self.type == 'loha' else 'Kronecker'} products, which no {self.type} file holds"
                   if self.init in ("compensated", "principal") else
                   f"it shapes LoRA's A factor, which {self.type} does not have" if self.init == "orthonormal" else
                   "a Kronecker product is zero only where a factor is, so nothing would cancel")
            raise ValueError(f"lora.init={self.init} does not apply to lora.type={self.type}: {why} (allowed: "
                             f"{', '.join(LYCORIS_INITS[self.type])})")
        if self.type in LYCORIS_INITS and not self.train_a:
            raise ValueError(f"lora.train_a=false (LoRA-FA) applies to lora and dora, not lora.type={self.type}")
        if self.lokr_factor == 0:  # a factor with another lora.type: config_effects.py
            raise ValueError("lora.lokr_factor=0: use -1 or a positive number")
        return self


class TextEncoderConfig(Section):
    train: bool = Field(True, description="Train LoRA on the text encoder.")
    clip_skip: int = Field(1, ge=1, description="Use the output of the N-th last layer (1 = last), then the final layer norm (SDXL and SD3: 1 is the penultimate layer without the norm, as their pipelines).")
    train_parts: Optional[list[str]] = Field(None, description="The text encoders trained when text_encoder.train is on, by the family's part names; default: each it trains by default (SD 1.x/2.x text_encoder; SDXL and SD3 text_encoder and text_encoder_2; add SD3's T5, text_encoder_3, to train it).")
    offload: Union[Literal["auto"], bool] = Field("auto", description="Keep frozen text encoders on the CPU, off the training device, when their outputs are cached (text_encoder.train false, data.cache_text_encoder_outputs true): each caption is encoded once there and its output moved to the device; samples move them to the device for the call. auto: on when frozen, cached and training on a GPU; true: also then; false: never (SD3.5's T5-XXL stays on the device, 8.8 GiB in bf16).")
    t5_max_length: int = Field(256, ge=1, le=512, description="SD3's T5 tokens per caption (the pipeline's max_sequence_length; kohya's t5xxl_max_token_length): padded and truncated to it; without T5, the length of the zeros fed in its place.")


class Config(Section):
    model: ModelConfig
    data: DataConfig
    output: OutputConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    text_encoder: TextEncoderConfig = Field(default_factory=TextEncoderConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    reg: RegConfig = Field(default_factory=RegConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    @model_validator(mode="after")
    def _combinations(self) -> "Config":
        """Rules that span sections; each names the keys involved."""
        if self.optim.warmup_steps > self.train.max_steps:
            raise ValueError(f"optim.warmup_steps ({self.optim.warmup_steps}) must be <= train.max_steps "
                             f"({self.train.max_steps}): the rate would never reach optim.lr")
        if self.validation.with_samples and not self.sample.has_prompts():
            raise ValueError("validation.with_samples needs sample prompts (sample.prompts, sample.entries or "
                             "sample.prompts_file)")
        lora = self.lora
        unet_targets = bool(lora.unet_targets) or (lora.conv and bool(lora.conv_targets))
        te_targets = self.text_encoder.train and bool(lora.text_encoder_targets)
        if not unet_targets and not te_targets:
            raise ValueError("nothing to train: lora.unet_targets is empty (and lora.conv is off or "
                             "lora.conv_targets empty) and the text encoder is not trained or has no targets")
        from sdlora.config_effects import check  # keys set where they have no effect: the errors among them

        try:
            check(self)
        except UserError as e:
            raise ValueError(str(e)) from None
        return self

    @property
    def text_encoder_lr(self) -> float:
        return self.optim.lr if self.optim.text_encoder_lr is None else self.optim.text_encoder_lr

    def part_rates(self) -> dict[str, float]:
        """optim.part_lr with optim.text_encoder_2_lr (kept for existing configs) folded in."""
        legacy = {"text_encoder_2": self.optim.text_encoder_2_lr} if self.optim.text_encoder_2_lr is not None else {}
        return {**legacy, **self.optim.part_lr}

    def part_lr(self, part) -> float:
        """The base rate of a part's adapters (`part`: a model/parts.Part): optim.part_lr's entry, else optim.lr for
        the denoiser and optim.text_encoder_lr for a text encoder."""
        rates = self.part_rates()
        if part.name in rates:
            return rates[part.name]
        return self.text_encoder_lr if part.role == "text_encoder" else self.optim.lr

    def data_subsets(self) -> list[SubsetConfig]:
        """data.path as a one-entry subset list, else data.subsets; a caption option or resolution a subset does not
        set is taken from data.*."""
        shared = {k: getattr(self.data, k) for k in CaptionOptions.model_fields} | {"resolution": self.data.resolution}
        if self.data.subsets:
            return [SubsetConfig(**{**shared, **s.model_dump(exclude_unset=True, exclude_none=True)}) for s in self.data.subsets]
        return [SubsetConfig(path=self.data.path, **shared)]

    def top_resolution(self) -> int:
        """The largest base resolution any subset trains at: the samples' default size, the run record's resolution."""
        return max(r for s in self.data_subsets() for r in resolution_list(s.resolution))

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


# ------------------------------------------------------------------------------------- validation & errors
def validate(data: dict) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        first = describe_error(Config, errors[0])
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise UserError(f"config error: {first}{more}") from None


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Config:
    data = read_config_file(path) if path is not None else {}
    return validate(apply_overrides(data, overrides or []))


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def describe_keys() -> str:
    """Every key with its default and description: the reference `sdlora config-help` prints (config_help.py)."""
    return describe_model(Config)
