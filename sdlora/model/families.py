"""The model families sdlora trains, registered by name: SD 1.x and SD 2.x (`ModelFamily`, model/family_base.py)
and SDXL (`SDXLFamily`, model/sdxl.py), each with its parts table (model/parts.py), and the lookups by name,
denoiser config and kohya version string. Adding a family is one new instance in `FAMILIES` (docs/architecture.md).
"""

from __future__ import annotations

from sdlora.errors import UserError
from sdlora.model import parts as P
from sdlora.model.family_base import PREDICTION_TYPES, RESOURCES, SUPPORTED, ModelFamily  # noqa: F401 (re-exported)
from sdlora.model.mmdit_keys import KOHYA_NAMES
from sdlora.model.sd3 import SD3Family
from sdlora.model.sdxl import (SDXLConditioning, SDXLFamily, micro_conditioning,  # noqa: F401 (re-exported)
                               sdxl_encoder_output, sdxl_hidden_state)


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
                  parts=P.SD1_PARTS, block_groups=block_groups(("text_encoder",)))
SD2 = ModelFamily(name="sd2", title="SD 2.x", kohya_version="sd_v2", modelspec_architecture="stable-diffusion-v2-512",
                  modelspec_architecture_v="stable-diffusion-v2-768-v", resolution=512, resolution_v=768,
                  v_version_suffix=True, parts=P.SD2_PARTS, block_groups=block_groups(("text_encoder",)))
# kohya and ModelSpec have one name for SDXL base and its v-prediction fine-tunes (ss_v_parameterization and
# modelspec.prediction_type tell them apart).
SDXL = SDXLFamily(
    name="sdxl", title="SDXL", kohya_version="sdxl_base_v1-0", modelspec_architecture="stable-diffusion-xl-v1-base",
    modelspec_architecture_v="stable-diffusion-xl-v1-base", resolution=1024, resolution_v=1024,
    parts=P.SDXL_PARTS,
    pipeline_class="StableDiffusionXLPipeline",
    text_outputs=(("text_encoder", "text_encoder", True), ("text_encoder_2", "text_encoder_2", True),
                  ("pooled", "text_encoder_2", False)),
    kohya_unet_layout={"layers_per_block": 2, "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                       "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")},
    # SDXL's original names (input / middle / output blocks) and diffusers' (down / mid / up) for one thing
    block_groups=block_groups(("text_encoder", "text_encoder_2"), {"down": "(?:down|input)", "mid": "(?:mid|middle)",
                                                                  "up": "(?:up|output)"}),
    # diffusers' converters read SDXL files offline from the bundled configs (sdlora/resources/configs/sdxl_base_v1-0)
    single_file_reader="diffusers",
    v_marker_keys=True,
    # SDXL was trained with zeroed conditioning for dropped captions, and its base pipeline samples that way
    pipeline_options={"force_zeros_for_empty_prompt": True, "add_watermarker": False},
)


def mmdit_block_groups(text_encoders: tuple[str, ...]) -> tuple:
    """SD3's `optim.lr_rules` named groups: each text encoder (and a CLIP's layers), the transformer and its joint
    blocks (`transformer.joint_blocks.N`, kohya's and the original MMDiT's name for diffusers' transformer_blocks.N)."""
    groups = [(rf"^{te}\.layers\.(\d+)$", rf"^{te}\.encoder\.(?:layers|block)\.{{0}}\.") for te in text_encoders]
    groups += [(rf"^{te}$", rf"^{te}\.") for te in text_encoders]
    groups += [(r"^transformer$", r"^transformer\."),
               (r"^transformer\.(?:joint|transformer)_blocks\.(\d+)$", r"^transformer\.transformer_blocks\.{0}\.")]
    return tuple(groups)


def _sd3(name: str, title: str, model_type: str, architecture: str) -> SD3Family:
    """An SD3-family instance; kohya's ss_base_model_version is its model type (library/sd3_utils.py) and
    ModelSpec's architecture stable-diffusion-3-<type> (library/sai_model_spec.py)."""
    return SD3Family(
        name=name, title=title, kohya_version=model_type, modelspec_architecture=architecture,
        modelspec_architecture_v=architecture, resolution=1024, resolution_v=1024, parts=P.SD3_PARTS,
        scheduler_class="FlowMatchEulerDiscreteScheduler", pipeline_class="StableDiffusion3Pipeline",
        text_outputs=(("text_encoder", "text_encoder", True), ("text_encoder_2", "text_encoder_2", True),
                      ("text_encoder_3", "text_encoder_3", True), ("pooled_l", "text_encoder", False),
                      ("pooled", "text_encoder_2", False)),  # the pooled vector's halves: CLIP-L's, CLIP-G's
        block_groups=mmdit_block_groups(("text_encoder", "text_encoder_2", "text_encoder_3")),
        single_file_reader="diffusers", pipeline_options={}, model_type=model_type,
        kohya_names=KOHYA_NAMES, kohya_network_module="networks.lora_sd3",
        target_presets={"attention": P.SD3_ATTENTION_TARGETS, "kohya": (r"re:^transformer_blocks\.",)})


SD3 = _sd3("sd3", "SD3 Medium", "medium", "stable-diffusion-3-medium")
SD35M = _sd3("sd35m", "SD3.5 Medium", "5-medium", "stable-diffusion-3-5-medium")
SD35L = _sd3("sd35l", "SD3.5 Large", "5-large", "stable-diffusion-3-5-large")
FAMILIES = {f.name: f for f in (SD1, SD2, SDXL, SD3, SD35M, SD35L)}


def family_named(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UserError(f"model family {name!r}: allowed {', '.join(FAMILIES)}") from None


def family_of_denoiser(denoiser) -> ModelFamily:
    """The family of a loaded denoiser (a diffusers UNet), from its config."""
    config = dict(denoiser.config)
    return next(f for f in FAMILIES.values() if f.matches_denoiser(config))


def family_of_version(version: str) -> tuple[ModelFamily, str]:
    """(family, prediction type) from kohya's ss_base_model_version (`sd_v1`, `sd_v2`, `sd_v2_v`)."""
    for f in FAMILIES.values():
        for prediction in PREDICTION_TYPES:
            if f.base_model_version(prediction) == version and (prediction == "epsilon" or f.v_version_suffix):
                return f, prediction
    raise UserError(f"base model version {version!r}: allowed sd_v1, sd_v2, sd_v2_v, sdxl_base_v1-0")
