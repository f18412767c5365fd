"""Model families: everything sdlora knows about one base-model architecture, in one object.

A family answers: which components it has and which text encoders can carry LoRA, how a caption becomes the
UNet's conditioning, the kohya prefix of each component, the metadata strings exports write (kohya's
`ss_base_model_version`, ModelSpec's architecture and resolution), the named block groups of
`optim.lr_rules`, how a diffusers UNet config or a single file's keys are recognised, each text encoder's
layout and prefix in a single file, whose converter reads its single files, where its bundled single-file
configs live, and which diffusers pipeline samples it (and is saved as a merged folder).

Architecture and prediction type are separate facts: a model is (family, prediction type). The strings that
combine them (`sd_v2_v`, `stable-diffusion-v2-768-v`) are produced here, for the formats that use them.
Adding a family is one new `ModelFamily` in `FAMILIES` (see docs/architecture.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdlora.errors import UserError
from sdlora.model import ldm_keys as L

RESOURCES = Path(__file__).resolve().parent.parent / "resources"
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class ModelFamily:
    name: str  # sd1 | sd2 | sdxl
    title: str  # for messages: "SD 1.x"
    kohya_version: str  # kohya's ss_base_model_version for epsilon models; "_v" is added for v-prediction
    modelspec_architecture: str  # ModelSpec's architecture for epsilon models
    modelspec_architecture_v: str  # ... for v-prediction models
    resolution: int  # the native training resolution (ModelSpec's default), epsilon
    resolution_v: int  # ... v-prediction
    text_encoders: tuple[str, ...] = ("text_encoder",)  # components that carry text-encoder LoRA
    kohya_prefixes: dict = field(default_factory=lambda: {"unet": "lora_unet_", "text_encoder": "lora_te_"})
    pipeline_class: str = "StableDiffusionPipeline"
    # The text-side outputs the UNet reads, each held on its own by the embedding-norm penalty and measured by the
    # drift probe: (name, the text encoder that computes it, per token (False: one vector per caption)).
    text_outputs: tuple = (("text_encoder", "text_encoder", True),)
    v_version_suffix: bool = False  # kohya writes `<version>_v` for v-prediction models (SD 2.x only)
    # The UNet's block structure where kohya names UNet modules by their original (LDM) names (SDXL): kohya's SDXL
    # scripts train the original UNet, so its files say input_blocks.4.1 for diffusers' down_blocks.1.attentions.0.
    # None: kohya uses diffusers' names (SD 1.x/2.x).
    kohya_unet_layout: dict | None = None
    # optim.lr_rules named groups -> regular expression over canonical module names (see lora/groups.py)
    block_groups: tuple = ()  # optim.lr_rules named groups -> regular expressions (`block_groups()` below)
    # The single-file (original LDM) layout: (component, layout of ldm_keys.TEXT_ENCODER_LAYOUTS, key prefix) per
    # text encoder, in `text_encoders` order.
    ldm_text_encoders: tuple = (("text_encoder", "clip_l", L.CLIP_L),)
    # Whose key mapping reads this family's single files: "sdlora" (model/ldm_keys.py, inverse of the writer) or
    # "diffusers" (its own single-file converters, offline with the bundled configs).
    single_file_reader: str = "sdlora"
    v_marker_keys: bool = False  # a v-prediction single file carries ComfyUI's `v_pred` (and `ztsnr`) marker keys
    # Keyword arguments of `pipeline_class` besides the models, tokenizers and scheduler.
    pipeline_options: dict = field(default_factory=lambda: {"safety_checker": None, "feature_extractor": None,
                                                           "requires_safety_checker": False})

    # -- names and metadata for a (family, prediction type) ------------------------------------------------
    def base_model_version(self, prediction_type: str) -> str:
        """kohya's ss_base_model_version (`sd_v1`, `sd_v2`, `sd_v2_v`); also names the bundled config folder.
        kohya has no v-prediction SD 1.x version string: such a model is `sd_v1` with ss_v_parameterization."""
        v = prediction_type == "v_prediction" and self.v_version_suffix
        return self.kohya_version + ("_v" if v else "")

    def architecture(self, prediction_type: str) -> str:
        return self.modelspec_architecture_v if prediction_type == "v_prediction" else self.modelspec_architecture

    def native_resolution(self, prediction_type: str) -> int:
        return self.resolution_v if prediction_type == "v_prediction" else self.resolution

    def modelspec(self, prediction_type: str, *, resolution: int | None = None, title: str, lora: bool) -> dict[str, str]:
        """ModelSpec 1.0.1 keys (A1111, ComfyUI, model sites read them), as kohya sd-scripts' sai_model_spec writes
        them; `resolution` is the trained one (default: the family's native resolution)."""
        import time

        size = resolution or self.native_resolution(prediction_type)
        return {"modelspec.sai_model_spec": "1.0.1",
                "modelspec.architecture": self.architecture(prediction_type) + ("/lora" if lora else ""),
                "modelspec.implementation": "diffusers" if lora else "https://github.com/Stability-AI/generative-models",
                "modelspec.title": title, "modelspec.resolution": f"{size}x{size}",
                "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
                "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def kohya_base_fields(self, prediction_type: str) -> dict[str, str]:
        """kohya's ss_* keys that name the base model: version, v2, v-parameterization."""
        return {"ss_base_model_version": self.base_model_version(prediction_type), "ss_v2": str(self.name == "sd2"),
                "ss_v_parameterization": str(prediction_type == "v_prediction")}

    def bundled_configs(self, prediction_type: str = "epsilon") -> Path:
        """diffusers configs (unet, vae, text_encoder, tokenizer, scheduler) for single files of this family."""
        return RESOURCES / "configs" / self.base_model_version(prediction_type)

    def named_group(self, match: str) -> re.Pattern | None:
        """The regular expression of an `optim.lr_rules` named group (`unet.up.1`), or None if `match` is none."""
        for named, pattern in self.block_groups:
            m = re.match(named, match)
            if m:
                return re.compile(pattern.format(*m.groups()) if m.groups() else pattern)
        return None

    # -- single files and pipelines ---------------------------------------------------------------------------
    @property
    def tokenizer_names(self) -> tuple[str, ...]:
        """The pipeline's tokenizer of each text encoder (`tokenizer`, `tokenizer_2`), in `text_encoders` order."""
        return tuple(n.replace("text_encoder", "tokenizer") for n in self.text_encoders)

    def pipeline(self, *, unet, vae, text_encoders: dict, tokenizers: list, scheduler):
        """The family's diffusers pipeline around these models (samples during training, the merged folder)."""
        import diffusers

        parts = {name: text_encoders[name] for name in self.text_encoders} | dict(zip(self.tokenizer_names, tokenizers))
        return getattr(diffusers, self.pipeline_class)(unet=unet, vae=vae, scheduler=scheduler, **parts,
                                                       **self.pipeline_options)

    def pipeline_embeddings(self, cond, uncond, dtype, *, empty_negative: bool = False) -> dict:
        """The pipeline call's embedding keyword arguments (`prompt_embeds`, `negative_prompt_embeds`: (batch, tokens,
        width) in `dtype`) for `encode`'s conditioning of the prompts and of the negative prompts. `empty_negative`:
        the negative prompt is the empty string (SD 1.x/2.x encode it like any prompt)."""
        return {"prompt_embeds": cond.to(dtype), "negative_prompt_embeds": uncond.to(dtype)}

    def matches_single_file(self, keys) -> bool:
        """Every text encoder of the family is in the file (a CLIP-L may lack the `text_model.` level: old SD 1.x)."""
        keys = list(keys)
        return all(any(k.startswith(prefix.removesuffix("text_model.")) for k in keys)
                   for _, _, prefix in self.ldm_text_encoders)

    def single_file_markers(self, prediction_type: str, zero_terminal_snr: bool = False) -> dict[str, torch.Tensor]:
        """Keys that tell a single file's readers what no weight shows: ComfyUI reads an SDXL file with `v_pred` as
        v-prediction, and with `ztsnr` as trained with zero terminal SNR (empty tensors; the key is the message)."""
        if not self.v_marker_keys or prediction_type != "v_prediction":
            return {}
        marks = {L.V_PRED_KEY: torch.zeros(0)}
        if zero_terminal_snr:
            marks[L.ZTSNR_KEY] = torch.zeros(0)
        return marks

    # -- conditioning -----------------------------------------------------------------------------------------
    def encode(self, text_encoders, input_ids, clip_skip: int = 1):
        """The conditioning for token ids (one tensor or a list of one per text encoder, as `text_encoders`):
        SD 1.x/2.x: the UNet's `encoder_hidden_states`, (batch, 77, hidden)."""
        from sdlora.model.text import encode

        text_encoder, ids = _only(text_encoders), _only(input_ids)
        return encode(text_encoder, ids, clip_skip)

    def unet_kwargs(self, embeddings, batch: dict | None = None) -> dict:
        """Keyword arguments of `UNet2DConditionModel.forward` that carry the conditioning of `batch`."""
        return {"encoder_hidden_states": embeddings}

    # -- the denoiser call and the noise process ------------------------------------------------------------
    def predict(self, denoiser, noisy, timesteps, conditioning, batch: dict | None = None) -> torch.Tensor:
        """The denoiser's prediction (B, C, h, w) for `noisy` (B, C, h, w) at `timesteps` (B,) (the objective's
        `Noised.timesteps`), conditioned on `encode`'s result and the batch's fields (`unet_kwargs`: SDXL's
        `added_cond_kwargs`)."""
        return denoiser(noisy, timesteps, **self.unet_kwargs(conditioning, batch)).sample

    def objective(self, noise_scheduler, vae_config, loss_cfg):
        """The noise process the family's denoiser was trained with (model/objective.py): DDPM, epsilon or
        v-prediction as `noise_scheduler` (its training scheduler) says; latents scaled (and shifted) as
        `vae_config` says; the loss section's timestep bounds, min-SNR and noise offset."""
        from sdlora.model.objective import DDPMObjective

        return DDPMObjective.from_config(noise_scheduler, vae_config, loss_cfg)

    def text_output(self, name: str, embeddings) -> torch.Tensor:
        """One of `text_outputs` out of `encode`'s result, (batch, tokens, width) (tokens = 1 for a pooled one)."""
        return embeddings

    def encode_text_output(self, name: str, text_encoder, input_ids, clip_skip: int = 1) -> torch.Tensor:
        """One of `text_outputs` from its own encoder alone, as `text_output` gives it (the penalty's base-norm
        cache and the drift probe run it with the adapters off)."""
        from sdlora.model.text import encode

        return encode(text_encoder, input_ids, clip_skip)

    # -- recognition --------------------------------------------------------------------------------------
    def matches_unet(self, unet_config) -> bool:
        if unet_config.get("addition_embed_type") == "text_time":
            return False
        sd2 = unet_config.get("cross_attention_dim") == 1024 or bool(unet_config.get("use_linear_projection"))
        return sd2 == (self.name == "sd2")


def _only(x):
    """The single element of a one-element list or tuple (SD 1.x/2.x have one text encoder), or `x` itself."""
    if isinstance(x, (list, tuple)):
        if len(x) != 1:
            raise ValueError(f"expected one text encoder's input, got {len(x)}")
        return x[0]
    return x


@dataclass
class SDXLConditioning:
    """What SDXL's text side gives the UNet, plus each encoder's own tokens (the regulariser and probe read them)."""

    hidden: torch.Tensor  # (batch, 77, 768 + 1280): both encoders' penultimate states side by side
    pooled: torch.Tensor  # (batch, 1280): text_encoder_2's projected pooled embedding (text_embeds)
    per_encoder: tuple  # (text_encoder's tokens, text_encoder_2's tokens), each (batch, 77, width)

    def rows(self, index) -> "SDXLConditioning":
        return SDXLConditioning(self.hidden[index], self.pooled[index], tuple(e[index] for e in self.per_encoder))

    def row(self, i: int) -> "SDXLConditioning":
        """Caption i's conditioning, copied (a cache entry must not keep the whole batch alive); the per-encoder
        tokens are views of its hidden states, which hold them side by side."""
        hidden = self.hidden[i].clone()
        return SDXLConditioning(hidden, self.pooled[i].clone(), tuple(hidden.split(self.widths(), dim=-1)))

    def widths(self) -> list[int]:
        return [e.shape[-1] for e in self.per_encoder]

    @staticmethod
    def stack(rows: list["SDXLConditioning"]) -> "SDXLConditioning":
        """The batch of single captions' conditionings (`row`), in order."""
        hidden = torch.stack([r.hidden for r in rows])
        return SDXLConditioning(hidden, torch.stack([r.pooled for r in rows]),
                                tuple(hidden.split(rows[0].widths(), dim=-1)))


def sdxl_hidden_state(out, clip_skip: int) -> torch.Tensor:
    """SDXL reads the penultimate layer (`hidden_states[-2]`, no final layer norm) at clip_skip=1, the default;
    clip_skip=N takes `hidden_states[-(N + 1)]`, as diffusers' `encode_prompt(clip_skip=N - 1)` does."""
    return out.hidden_states[-(clip_skip + 1)]


def sdxl_encoder_output(text_encoder, input_ids: torch.Tensor, clip_skip: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One SDXL encoder on (batch, 77·k) ids (k chunks of long captions, model/text.py): each chunk encoded on its
    own, hidden states (batch, 77·k, width) side by side as for SD 1.x; the projected pooled embedding (batch,
    width) of the first chunk, as AUTOMATIC1111 and kohya's sd-scripts take it (None for CLIP-L, which has none)."""
    from sdlora.model.text import window_of

    window = window_of(text_encoder)
    batch, width = input_ids.shape
    if width % window:
        raise ValueError(f"token ids of width {width} are not whole chunks of {window}")
    out = text_encoder(input_ids.reshape(-1, window), output_hidden_states=True, return_dict=True)
    hidden = sdxl_hidden_state(out, clip_skip).reshape(batch, width, -1)
    pooled = getattr(out, "text_embeds", None)
    return hidden, (None if pooled is None else pooled.reshape(batch, width // window, -1)[:, 0])


def micro_conditioning(original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: torch.Tensor) -> torch.Tensor:
    """SDXL's `time_ids`: (batch, 6) = original (h, w), crop top-left (top, left), target (h, w), as
    `StableDiffusionXLPipeline._get_add_time_ids` lays them out."""
    return torch.cat([original_size, crop_top_left, target_size], dim=1).float()


@dataclass(frozen=True)
class SDXLFamily(ModelFamily):
    """SDXL: two text encoders (CLIP-L and OpenCLIP bigG) side by side, a pooled embedding and micro-conditioning.

    Caption dropout (and any empty caption) conditions the UNet on zeros, hidden states and pooled embedding
    alike, as SDXL was trained (its embedders' `ucg_rate` zeroes their output) and as its pipeline's
    `force_zeros_for_empty_prompt` samples the unconditional branch; the six micro-conditioning numbers stay."""

    def encode(self, text_encoders, input_ids, clip_skip: int = 1) -> SDXLConditioning:
        te1, te2 = text_encoders
        ids1, ids2 = input_ids
        h1, _ = sdxl_encoder_output(te1, ids1, clip_skip)
        h2, pooled = sdxl_encoder_output(te2, ids2, clip_skip)
        return SDXLConditioning(torch.cat([h1, h2], dim=-1), pooled, (h1, h2))

    def unet_kwargs(self, embeddings: SDXLConditioning, batch: dict | None = None) -> dict:
        if batch is None:
            raise ValueError("SDXL conditioning needs the batch's original sizes and crops")
        device, dtype = embeddings.hidden.device, embeddings.hidden.dtype
        hidden, pooled = embeddings.hidden, embeddings.pooled
        if "captions" in batch:
            keep = torch.tensor([bool(c) for c in batch["captions"]], device=device)
            if not bool(keep.all()):  # dropped or empty captions: zeroed conditioning (see the class docstring)
                hidden = hidden * keep[:, None, None].to(dtype)
                pooled = pooled * keep[:, None].to(pooled.dtype)
        time_ids = micro_conditioning(batch["original_size"], batch["crop_top_left"], batch["target_size"])
        return {"encoder_hidden_states": hidden,
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.to(device, dtype)}}

    def pipeline_embeddings(self, cond: SDXLConditioning, uncond: SDXLConditioning, dtype, *,
                            empty_negative: bool = False) -> dict:
        """An empty negative prompt is zeros, hidden states and pooled embedding alike, as SDXL was trained (the
        class docstring) and as its pipeline's `force_zeros_for_empty_prompt` samples it."""
        if empty_negative:
            uncond = SDXLConditioning(uncond.hidden * 0, uncond.pooled * 0, uncond.per_encoder)
        return {"prompt_embeds": cond.hidden.to(dtype), "negative_prompt_embeds": uncond.hidden.to(dtype),
                "pooled_prompt_embeds": cond.pooled.to(dtype), "negative_pooled_prompt_embeds": uncond.pooled.to(dtype)}

    def text_output(self, name: str, embeddings: SDXLConditioning) -> torch.Tensor:
        if name == "pooled":
            return embeddings.pooled[:, None, :]
        return embeddings.per_encoder[("text_encoder", "text_encoder_2").index(name)]

    def encode_text_output(self, name: str, text_encoder, input_ids, clip_skip: int = 1) -> torch.Tensor:
        hidden, pooled = sdxl_encoder_output(text_encoder, input_ids, clip_skip)
        return pooled[:, None, :] if name == "pooled" else hidden

    def matches_unet(self, unet_config) -> bool:
        return unet_config.get("addition_embed_type") == "text_time"



def block_groups(text_encoders: tuple[str, ...], unet_names: dict[str, str] | None = None) -> tuple:
    """`optim.lr_rules` named groups -> regular expressions over canonical module names: each text encoder and its
    layers, the UNet, and its down / mid / up blocks (`unet_names` gives other words for them, e.g. SDXL's input)."""
    names = {"down": "down", "mid": "mid", "up": "up", **(unet_names or {})}
    groups = [(rf"^{te}\.layers\.(\d+)$", rf"^{te}\.encoder\.layers\.{{0}}\.") for te in text_encoders]
    groups += [(rf"^{te}$", rf"^{te}\.") for te in text_encoders]
    groups += [(r"^unet$", r"^unet\."),
               (rf"^unet\.{names['down']}$", r"^unet\.(down_blocks\.|conv_in)"),
               (rf"^unet\.{names['down']}\.(\d+)$", r"^unet\.down_blocks\.{0}\."),
               (rf"^unet\.{names['mid']}$", r"^unet\.mid_block\."),
               (rf"^unet\.{names['up']}$", r"^unet\.(up_blocks\.|conv_out)"),
               (rf"^unet\.{names['up']}\.(\d+)$", r"^unet\.up_blocks\.{0}\.")]
    return tuple(groups)

SD1 = ModelFamily(name="sd1", title="SD 1.x", kohya_version="sd_v1", modelspec_architecture="stable-diffusion-v1",
                  modelspec_architecture_v="stable-diffusion-v1", resolution=512, resolution_v=512,
                  block_groups=block_groups(("text_encoder",)))
SD2 = ModelFamily(name="sd2", title="SD 2.x", kohya_version="sd_v2", modelspec_architecture="stable-diffusion-v2-512",
                  modelspec_architecture_v="stable-diffusion-v2-768-v", resolution=512, resolution_v=768,
                  v_version_suffix=True, block_groups=block_groups(("text_encoder",)),
                  ldm_text_encoders=(("text_encoder", "open_clip", L.OPEN_CLIP),))
# kohya and ModelSpec have one name for SDXL base and its v-prediction fine-tunes (ss_v_parameterization and
# modelspec.prediction_type tell them apart).
SDXL = SDXLFamily(
    name="sdxl", title="SDXL", kohya_version="sdxl_base_v1-0", modelspec_architecture="stable-diffusion-xl-v1-base",
    modelspec_architecture_v="stable-diffusion-xl-v1-base", resolution=1024, resolution_v=1024,
    text_encoders=("text_encoder", "text_encoder_2"),
    kohya_prefixes={"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
    pipeline_class="StableDiffusionXLPipeline",
    text_outputs=(("text_encoder", "text_encoder", True), ("text_encoder_2", "text_encoder_2", True),
                  ("pooled", "text_encoder_2", False)),
    kohya_unet_layout={"layers_per_block": 2, "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                       "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")},
    # SDXL's original names (input / middle / output blocks) and diffusers' (down / mid / up) for one thing
    block_groups=block_groups(("text_encoder", "text_encoder_2"), {"down": "(?:down|input)", "mid": "(?:mid|middle)",
                                                                  "up": "(?:up|output)"}),
    ldm_text_encoders=(("text_encoder", "clip_l", L.SDXL_CLIP_L), ("text_encoder_2", "open_clip", L.SDXL_OPEN_CLIP)),
    # diffusers' converters read SDXL files offline from the bundled configs (sdlora/resources/configs/sdxl_base_v1-0)
    single_file_reader="diffusers",
    v_marker_keys=True,
    # SDXL was trained with zeroed conditioning for dropped captions, and its base pipeline samples that way
    pipeline_options={"force_zeros_for_empty_prompt": True, "add_watermarker": False},
)
FAMILIES = {f.name: f for f in (SD1, SD2, SDXL)}
SUPPORTED = "sdlora trains SD 1.x, SD 2.x (StableDiffusionPipeline) and SDXL (StableDiffusionXLPipeline) models"


def family_named(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UserError(f"model family {name!r}: allowed {', '.join(FAMILIES)}") from None


def family_of_unet(unet) -> ModelFamily:
    """The family of a loaded diffusers UNet, from its config."""
    config = dict(unet.config)
    return next(f for f in FAMILIES.values() if f.matches_unet(config))


def family_of_version(version: str) -> tuple[ModelFamily, str]:
    """(family, prediction type) from kohya's ss_base_model_version (`sd_v1`, `sd_v2`, `sd_v2_v`)."""
    for f in FAMILIES.values():
        for prediction in PREDICTION_TYPES:
            if f.base_model_version(prediction) == version and (prediction == "epsilon" or f.v_version_suffix):
                return f, prediction
    raise UserError(f"base model version {version!r}: allowed sd_v1, sd_v2, sd_v2_v, sdxl_base_v1-0")
