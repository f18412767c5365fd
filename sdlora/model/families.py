"""Model families: everything sdlora knows about one base-model architecture, in one object.

A family answers: which components it has and which text encoders can carry LoRA, how a caption becomes the
UNet's conditioning, the kohya prefix of each component, the metadata strings exports write (kohya's
`ss_base_model_version`, ModelSpec's architecture and resolution), the named block groups of
`optim.lr_rules`, how a diffusers UNet config or a single file's keys are recognised, where its bundled
single-file configs live, and which diffusers pipeline samples it.

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

RESOURCES = Path(__file__).resolve().parent.parent / "resources"
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class ModelFamily:
    name: str  # sd1 | sd2
    title: str  # for messages: "SD 1.x"
    kohya_version: str  # kohya's ss_base_model_version for epsilon models; "_v" is added for v-prediction
    modelspec_architecture: str  # ModelSpec's architecture for epsilon models
    modelspec_architecture_v: str  # ... for v-prediction models
    resolution: int  # the native training resolution (ModelSpec's default), epsilon
    resolution_v: int  # ... v-prediction
    text_encoders: tuple[str, ...] = ("text_encoder",)  # components that carry text-encoder LoRA
    kohya_prefixes: dict = field(default_factory=lambda: {"unet": "lora_unet_", "text_encoder": "lora_te_"})
    pipeline_class: str = "StableDiffusionPipeline"
    # optim.lr_rules named groups -> regular expression over canonical module names (see lora/groups.py)
    block_groups: tuple = (
        (r"^text_encoder\.layers\.(\d+)$", r"^text_encoder\.encoder\.layers\.{0}\."),
        (r"^text_encoder$", r"^text_encoder\."),
        (r"^unet$", r"^unet\."),
        (r"^unet\.down$", r"^unet\.(down_blocks\.|conv_in)"),
        (r"^unet\.down\.(\d+)$", r"^unet\.down_blocks\.{0}\."),
        (r"^unet\.mid$", r"^unet\.mid_block\."),
        (r"^unet\.up$", r"^unet\.(up_blocks\.|conv_out)"),
        (r"^unet\.up\.(\d+)$", r"^unet\.up_blocks\.{0}\."),
    )

    # -- names and metadata for a (family, prediction type) ------------------------------------------------
    def base_model_version(self, prediction_type: str) -> str:
        """kohya's ss_base_model_version (`sd_v1`, `sd_v2`, `sd_v2_v`); also names the bundled config folder.
        kohya has no v-prediction SD 1.x version string: such a model is `sd_v1` with ss_v_parameterization."""
        v = prediction_type == "v_prediction" and self.name != "sd1"
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

    # -- conditioning -----------------------------------------------------------------------------------------
    def encode(self, text_encoder, input_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        """The UNet's `encoder_hidden_states` for token ids: (batch, 77, hidden)."""
        from sdlora.model.text import encode

        return encode(text_encoder, input_ids, clip_skip)

    def unet_kwargs(self, embeddings: torch.Tensor) -> dict:
        """Keyword arguments of `UNet2DConditionModel.forward` that carry the conditioning."""
        return {"encoder_hidden_states": embeddings}

    # -- recognition --------------------------------------------------------------------------------------
    def matches_unet(self, unet_config) -> bool:
        sd2 = unet_config.get("cross_attention_dim") == 1024 or bool(unet_config.get("use_linear_projection"))
        return sd2 == (self.name == "sd2")


SD1 = ModelFamily(name="sd1", title="SD 1.x", kohya_version="sd_v1", modelspec_architecture="stable-diffusion-v1",
                  modelspec_architecture_v="stable-diffusion-v1", resolution=512, resolution_v=512)
SD2 = ModelFamily(name="sd2", title="SD 2.x", kohya_version="sd_v2", modelspec_architecture="stable-diffusion-v2-512",
                  modelspec_architecture_v="stable-diffusion-v2-768-v", resolution=512, resolution_v=768)
FAMILIES = {f.name: f for f in (SD1, SD2)}
SUPPORTED = f"sdlora trains {' and '.join(f.title for f in FAMILIES.values())} (StableDiffusionPipeline) models"


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
            if f.base_model_version(prediction) == version and (prediction == "epsilon" or f.name != "sd1"):
                return f, prediction
    raise UserError(f"base model version {version!r}: allowed sd_v1, sd_v2, sd_v2_v")
