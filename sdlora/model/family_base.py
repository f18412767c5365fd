"""What a model family answers, as one class: `ModelFamily` (SD 1.x and 2.x are instances of it; SDXL's subclass is
model/sdxl.py; the registered families are model/families.py's).

A family answers: its parts (model/parts.py: the denoiser, the text encoders and which carry LoRA, the VAE; their
classes, subfolders and file prefixes), how a caption becomes the denoiser's conditioning, how the denoiser is
called (`predict`) and which noise process it was trained with (`objective`), the metadata strings exports write
(kohya's `ss_base_model_version`, ModelSpec's architecture and resolution), the named block groups of
`optim.lr_rules`, how a diffusers folder, a denoiser config or a single file's keys are recognised, whose converter
reads its single files, where its bundled single-file configs live, and which diffusers pipeline samples it (and is
saved as a merged folder).

Architecture and prediction type are separate facts: a model is (family, prediction type). The strings that
combine them (`sd_v2_v`, `stable-diffusion-v2-768-v`) are produced here, for the formats that use them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdlora.config_loss import DDPM_ONLY
from sdlora.errors import UserError
from sdlora.model import ldm_keys as L
from sdlora.model import parts as P

RESOURCES = Path(__file__).resolve().parent.parent / "resources"
PREDICTION_TYPES = ("epsilon", "v_prediction")
SUPPORTED = ("sdlora trains SD 1.x, SD 2.x (StableDiffusionPipeline), SDXL (StableDiffusionXLPipeline) and SD3 / SD3.5 "
             "(StableDiffusion3Pipeline) models")


@dataclass(frozen=True)
class ModelFamily:
    name: str  # sd1 | sd2 | sdxl
    title: str  # for messages: "SD 1.x"
    kohya_version: str  # kohya's ss_base_model_version for epsilon models; "_v" is added for v-prediction
    modelspec_architecture: str  # ModelSpec's architecture for epsilon models
    modelspec_architecture_v: str  # ... for v-prediction models
    resolution: int  # the native training resolution (ModelSpec's default), epsilon
    resolution_v: int  # ... v-prediction
    # The parts (model/parts.py): the denoiser, the text encoders in the order the conditioning reads them, the VAE.
    parts: tuple = ()
    # The scheduler class a folder's scheduler/ config is read into for training (the noise process's).
    scheduler_class: str = "DDPMScheduler"
    pipeline_class: str = "StableDiffusionPipeline"
    # The text-side outputs the UNet reads, each held on its own by the embedding-norm penalty and measured by the
    # drift probe: (name, the text encoder that computes it, per token (False: one vector per caption)).
    text_outputs: tuple = (("text_encoder", "text_encoder", True),)
    v_version_suffix: bool = False  # kohya writes `<version>_v` for v-prediction models (SD 2.x only)
    # The UNet's block structure where kohya names UNet modules by their original (LDM) names (SDXL): kohya's SDXL
    # scripts train the original UNet, so its files say input_blocks.4.1 for diffusers' down_blocks.1.attentions.0.
    # None: kohya uses diffusers' names (SD 1.x/2.x).
    kohya_unet_layout: dict | None = None
    # kohya's names of the denoiser's modules where they are not one per diffusers module (SD3: the original MMDiT
    # names with q/k/v fused, model/mmdit_keys.KOHYA_NAMES: `pair(path, shape)`, `pairs(name, shape)`); None: one
    # kohya name per module (`adapter/kohya.kohya_name`).
    kohya_names: object | None = None
    kohya_network_module: str = "networks.lora"  # kohya's LoRA module for the family (ss_network_module)
    # optim.lr_rules named groups -> regular expression over canonical module names (see lora/groups.py)
    block_groups: tuple = ()  # optim.lr_rules named groups -> regular expressions (`block_groups()` below)
    # Whose key mapping reads this family's single files: "sdlora" (model/ldm_keys.py, inverse of the writer) or
    # "diffusers" (its own single-file converters, offline with the bundled configs).
    single_file_reader: str = "sdlora"
    v_marker_keys: bool = False  # a v-prediction single file carries ComfyUI's `v_pred` (and `ztsnr`) marker keys
    # Export formats (commands/export.FORMATS) this family cannot write yet, refused by name (SD3: its single file).
    formats_missing: tuple = ()
    # Named sets of denoiser targets (`lora.unet_targets: [preset:<name>]`), e.g. SD3's diffusers and kohya sets.
    target_presets: dict = field(default_factory=dict)
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

    # -- the run's config --------------------------------------------------------------------------------------
    def check_config(self, cfg) -> None:
        """Refuse (a UserError, one line) config keys this family cannot honour, once the model is known: a DDPM
        family refuses loss.flow (rectified flow's keys); SD3 refuses the DDPM-only ones (model/sd3.py)."""
        flow = cfg.loss.flow
        changed = [k for k, f in type(flow).model_fields.items() if getattr(flow, k) != f.get_default(call_default_factory=True)]
        if changed:  # values other than the defaults (a config written out by sdlora holds every key)
            key = changed[0]
            raise UserError(f"loss.flow.{key}: rectified-flow keys apply to SD3 / SD3.5 models; {self.title} trains "
                            f"with DDPM (its keys: loss.{', '.join(DDPM_ONLY)})")
        if cfg.sample.skip_layer_guidance is not None:
            raise UserError(f"sample.skip_layer_guidance: skip-layer guidance is StableDiffusion3Pipeline's (SD3 / "
                            f"SD3.5); {self.title}'s pipeline has none (remove the key)")
        self.check_train_parts(cfg)

    def check_train_parts(self, cfg) -> None:
        """A UserError naming a text_encoder.train_parts entry that is none of this family's text encoders."""
        for name in cfg.text_encoder.train_parts or ():
            if name not in self.text_encoders:
                raise UserError(f"text_encoder.train_parts: {self.title} has no text encoder {name!r} (its text "
                                f"encoders: {', '.join(self.text_encoders)})")

    def for_run(self, comps, cfg) -> "ModelFamily":
        """The family instance a run uses with these loaded parts (SD3 records its transformer's text width and its
        T5 length); the SD families need nothing."""
        return self

    def trained_text_encoders(self, cfg) -> tuple[str, ...]:
        """The text encoders that carry adapters: none unless text_encoder.train; then text_encoder.train_parts, or
        each whose part row says it does (`Part.lora`)."""
        if not cfg.text_encoder.train:
            return ()
        chosen = cfg.text_encoder.train_parts
        return tuple(p.name for p in self.text_encoder_parts if (p.name in chosen if chosen is not None else p.lora))

    def lora_targets(self, part: P.Part, lora_cfg) -> list[str]:
        """The Linear targets of a part: lora.unet_targets (the denoiser) or lora.text_encoder_targets where the
        config gives other than their defaults, else the part's own defaults (`Part.targets`), else the config's
        defaults; `preset:<name>` entries expand to the family's `target_presets`."""
        key = "unet_targets" if part.role == P.DENOISER else "text_encoder_targets"
        default = type(lora_cfg).model_fields[key].get_default(call_default_factory=True)
        if getattr(lora_cfg, key) == default and part.targets is not None:  # unset, or written out as the default
            return list(part.targets)
        targets = []
        for t in getattr(lora_cfg, key):
            if t.startswith("preset:"):
                if part.role != P.DENOISER or t[7:] not in self.target_presets:
                    allowed = ", ".join(f"preset:{n}" for n in self.target_presets) or "none"
                    raise UserError(f"lora.{key}: {t!r} is no preset of {self.title}'s {part.name} (allowed: {allowed})")
                targets += self.target_presets[t[7:]]
            else:
                targets.append(t)
        return targets

    # -- parts (model/parts.py) -------------------------------------------------------------------------------
    def __post_init__(self):
        roles = [p.role for p in self.parts]
        if roles.count(P.DENOISER) != 1 or roles.count(P.VAE) != 1 or len({p.name for p in self.parts}) != len(roles):
            raise ValueError(f"family {self.name}: needs one denoiser, one VAE and distinct part names, got {roles}")

    def part(self, name: str) -> P.Part:
        """The part called `name`; a KeyError naming the family's parts when it has none."""
        for p in self.parts:
            if p.name == name:
                return p
        raise KeyError(f"{self.title} has no part {name!r} (its parts: {', '.join(p.name for p in self.parts)})")

    @property
    def denoiser(self) -> P.Part:
        return next(p for p in self.parts if p.role == P.DENOISER)

    @property
    def vae(self) -> P.Part:
        return next(p for p in self.parts if p.role == P.VAE)

    @property
    def text_encoder_parts(self) -> tuple[P.Part, ...]:
        return tuple(p for p in self.parts if p.role == P.TEXT_ENCODER)

    @property
    def text_encoders(self) -> tuple[str, ...]:
        """The text encoders' part names, in the order the family's conditioning reads them."""
        return tuple(p.name for p in self.text_encoder_parts)

    @property
    def adaptable_parts(self) -> tuple[str, ...]:
        """The parts adapters can live in: the denoiser, then the text encoders."""
        return (self.denoiser.name, *self.text_encoders)

    @property
    def kohya_prefixes(self) -> dict[str, str]:
        """kohya's LoRA key prefix of each adaptable part (`lora_unet_`, `lora_te_` or SDXL's `lora_te1_` / `lora_te2_`)."""
        return {p.name: p.kohya_prefix for p in self.parts if p.adaptable}

    @property
    def ldm_text_encoders(self) -> tuple[tuple[str, str, str], ...]:
        """The single-file (original LDM) layout: (part, layout of ldm_keys.TEXT_ENCODER_LAYOUTS, key prefix) per
        text encoder, in `text_encoders` order."""
        return tuple((p.name, *p.single_file) for p in self.text_encoder_parts)

    # -- single files and pipelines ---------------------------------------------------------------------------
    @property
    def tokenizer_names(self) -> tuple[str, ...]:
        """The pipeline's tokenizer of each text encoder (`tokenizer`, `tokenizer_2`), in `text_encoders` order."""
        return tuple(p.tokenizer for p in self.text_encoder_parts)

    def pipeline(self, *, denoiser, vae, text_encoders: dict, tokenizers: list, scheduler):
        """The family's diffusers pipeline around these models (samples during training, the merged folder)."""
        import diffusers

        parts = {name: text_encoders[name] for name in self.text_encoders} | dict(zip(self.tokenizer_names, tokenizers))
        return getattr(diffusers, self.pipeline_class)(**{self.denoiser.name: denoiser}, vae=vae, scheduler=scheduler,
                                                       **parts, **self.pipeline_options)

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
    def latent_multiple(self, denoiser) -> int:
        """The latent cells a training latent's sides must be a multiple of: 1 for a UNet (diffusers' UNet sizes
        its upsampling to odd inputs), the patch size for a patchifying transformer (SD3: 2)."""
        return 1

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
    def matches_denoiser(self, config) -> bool:
        """Whether a denoiser config (a dict) is this family's: SD 2.x's UNet reads 1024-wide text or projects
        linearly, SD 1.x's neither; neither has SDXL's text_time embedding."""
        if config.get("addition_embed_type") == "text_time" or "joint_attention_dim" in config:  # SDXL, a transformer
            return False
        sd2 = config.get("cross_attention_dim") == 1024 or bool(config.get("use_linear_projection"))
        return sd2 == (self.name == "sd2")

    def claims_folder(self, index: dict, denoiser_config: dict) -> bool:
        """Whether a diffusers folder (its model_index.json and its denoiser's config.json, both as dicts) is this
        family's, or an incomplete or unsupported model of it that `check_folder` refuses by name."""
        return not _sdxl_like(index, denoiser_config) and self.matches_denoiser(denoiser_config)

    def check_folder(self, path, index: dict, denoiser_config: dict) -> None:
        """Refuse, before any weight loads, a folder of this family sdlora cannot train (a UserError naming it)."""
        kind = denoiser_config.get("addition_embed_type") or denoiser_config.get("class_embed_type")
        if kind:
            pipeline = str(index.get("_class_name", ""))
            raise UserError(f"model.path: {path} is a {pipeline or 'UNet'} with extra conditioning ({kind}); {SUPPORTED}")


def _only(x):
    """The single element of a one-element list or tuple (SD 1.x/2.x have one text encoder), or `x` itself."""
    if isinstance(x, (list, tuple)):
        if len(x) != 1:
            raise ValueError(f"expected one text encoder's input, got {len(x)}")
        return x[0]
    return x


def _sdxl_like(index: dict, denoiser_config: dict) -> bool:
    """An SDXL folder, complete or not: a text_time UNet, an XL pipeline or a second text encoder."""
    return (denoiser_config.get("addition_embed_type") == "text_time" or "XL" in str(index.get("_class_name", ""))
            or "text_encoder_2" in index)
