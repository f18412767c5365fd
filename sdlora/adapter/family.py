"""Which model family (and prediction type) an adapter belongs to: its sdlora run record's, else what its module
names and shapes show, else what the file's own kohya / ModelSpec metadata says, else SD 1.x (epsilon).

Another trainer's file (kohya sd-scripts, LyCORIS, `sdlora extract`, a merge or resize of one) carries no run record,
and every writer of kohya names and labels must still know the family: SDXL's UNet is named by its original (LDM)
blocks there (`lora_unet_input_blocks_4_1_...`), SD 1.x/2.x's by diffusers' paths. Evidence from the modules
(canonical names, so kohya's SDXL names have already been mapped to diffusers' paths):
- SDXL: a `text_encoder_2.` module; attention in the first up block (`unet.up_blocks.0.attentions`); a transformer
  block past the first (`transformer_blocks.1`, SD 1.x/2.x have one per attention); `unet.add_embedding`; a
  cross-attention key/value projection reading 2048 features (768 + 1280).
- SD 1.x/2.x: attention in the first down block, a fourth down or up block; cross-attention from 768 / 1024.
- SD 2.x rather than 1.x: Linear `proj_in` / `proj_out` (SD 1.x's are 1x1 convolutions), cross-attention or a
  text-encoder layer 1024 wide. Nothing in the weights tells v-prediction; the metadata may.
- SD3: a `transformer.` module (kohya's `lora_unet_joint_blocks_...` names read as such); SD3.5 Medium: `attn2`.
The metadata read: kohya's `ss_base_model_version` (`sd_v1`, `sd_v2`, `sd_v2_v`, `sdxl_base_v1-0`; SD3's `medium`,
`5-medium`, `5-large`) and `ss_v_parameterization`, ModelSpec's `modelspec.architecture` and
`modelspec.prediction_type`.
"""

from __future__ import annotations

import re

from sdlora.adapter.run_record import RunRecord
from sdlora.model.families import FAMILIES, SD1, SD2, SD3, SD35L, SD35M, SDXL, ModelFamily, family_of_version

_SDXL_NAMES = re.compile(r"^(text_encoder_2\.|unet\.up_blocks\.0\.attentions\.|unet\.add_embedding\.|"
                         r"unet\..*\.transformer_blocks\.[1-9])")
_SD12_NAMES = re.compile(r"^unet\.(down_blocks\.0\.attentions\.|down_blocks\.3\.|up_blocks\.3\.)")
_CROSS_KV = re.compile(r"^unet\..*\.attn2\.to_[kv]$")
_PROJ = re.compile(r"^unet\..*\.attentions\.\d+\.proj_(in|out)$")
_TE_LAYER = re.compile(r"^text_encoder\.encoder\.layers\.\d+\.self_attn\.q_proj$")


def family_from_modules(modules: dict) -> str | None:
    """'sdxl', 'sd1', 'sd2', 'sd1or2' (SD 1.x or 2.x, nothing shows which), 'sd3' / 'sd35m' (an MMDiT `transformer.`
    module: an SD3-family adapter; a second image attention, `attn2`, is SD3.5 Medium's), or None (nothing shows
    the family)."""
    mmdit = [n for n in modules if n.startswith(f"{SD3.denoiser.name}.")]
    if mmdit:
        return "sd35m" if any(".attn2." in n for n in mmdit) else "sd3"
    sdxl = sd12 = sd1 = sd2 = linear_proj = False
    for name, m in modules.items():
        shape = m.weight_shape
        sdxl |= bool(_SDXL_NAMES.match(name))
        sd12 |= bool(_SD12_NAMES.match(name))
        if _CROSS_KV.match(name) and len(shape) >= 2:
            sdxl |= shape[1] == 2048
            sd1 |= shape[1] == 768
            sd2 |= shape[1] == 1024
        if _PROJ.match(name) and m.kind in ("lora", "dora"):  # their shapes say Linear or conv (LyCORIS' may be flat)
            sd1 |= len(shape) == 4  # a 1x1 conv: SD 1.x (SD 2.x and SDXL use Linear)
            linear_proj |= len(shape) == 2
        if _TE_LAYER.match(name) and len(shape) >= 2:
            sd2 |= shape[1] == 1024  # OpenCLIP-H; SDXL's first encoder is CLIP-L (768)
    sd12 |= sd1 or sd2
    if sdxl == sd12:  # nothing shows it, or the modules contradict each other
        return None
    if sdxl:
        return "sdxl"
    sd2 |= linear_proj
    return "sd1or2" if sd1 == sd2 else ("sd1" if sd1 else "sd2")


def family_from_metadata(meta: dict[str, str]) -> tuple[ModelFamily, str] | None:
    """(family, prediction type) from kohya's or ModelSpec's keys; None when the file says nothing (or nonsense)."""
    version = meta.get("ss_base_model_version", "")
    v = str(meta.get("ss_v_parameterization", "")).lower() == "true" or meta.get("modelspec.prediction_type") == "v"
    if version.startswith("sdxl"):
        return SDXL, "v_prediction" if v else "epsilon"
    if version.startswith("sd_v2"):
        return SD2, "v_prediction" if v or version.endswith("_v") else "epsilon"
    if version.startswith("sd_v1"):
        return SD1, "v_prediction" if v else "epsilon"
    arch = meta.get("modelspec.architecture", "")
    for family in (SD3, SD35M, SD35L):  # kohya's SD3 model types and ModelSpec architectures (families.py)
        if version == family.kohya_version or arch.removesuffix("/lora") == family.modelspec_architecture:
            return family, "epsilon"
    if arch.startswith("stable-diffusion-xl"):
        return SDXL, "v_prediction" if v else "epsilon"
    if arch.startswith("stable-diffusion-v2"):
        return SD2, "v_prediction" if v or "-v/" in arch + "/" else "epsilon"
    if arch.startswith("stable-diffusion-v1"):
        return SD1, "v_prediction" if v else "epsilon"
    return None


def adapter_family(adapter, base_model_version: str | None = None) -> tuple[ModelFamily, str]:
    """(family, prediction type) of `adapter` (an AdapterWeights): its run record's; else its modules' family
    (`family_from_modules`), with the prediction type of `base_model_version` (what the caller knows, e.g. the
    model extract read) or of the file's metadata where they name the same family; else `base_model_version`'s,
    else the metadata's, else SD 1.x epsilon."""
    record = RunRecord.from_metadata(adapter.metadata)
    if record is not None:
        return record.family, record.prediction_type
    stated = [family_of_version(base_model_version)] if base_model_version else []
    if (said := family_from_metadata(adapter.metadata)) is not None:
        stated.append(said)
    seen = family_from_modules(adapter.modules)
    if seen is None:
        return stated[0] if stated else (SD1, "epsilon")
    allowed = {"sd1or2": ("sd1", "sd2"), "sd3": ("sd3", "sd35l", "sd35m")}.get(seen, (seen,))
    for family, prediction in stated:
        if family.name in allowed:
            return family, prediction
    return FAMILIES[allowed[0]], "epsilon"
