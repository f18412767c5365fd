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
- SD3 / SD3.5: a `transformer.` (MMDiT; kohya's `lora_unet_joint_blocks_...` names are read as such) or
  `text_encoder_3.` (T5) module; which one: SD3.5 Medium where a joint
  block has the second attention `attn2`, SD3.5 Large where a joint block is 2432 wide (38 heads of 64), else SD3
  Medium (1536 wide). A file with only CLIP modules, `text_encoder_2.` among them, is SDXL's or SD3's: its metadata
  decides, else SDXL.
The metadata read: kohya's `ss_base_model_version` (`sd_v1`, `sd_v2`, `sd_v2_v`, `sdxl_base_v1-0`, the SD3 families'
model types) and `ss_v_parameterization`, ModelSpec's `modelspec.architecture` (SD3: `stable-diffusion-3-...`) and
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
SD3_FAMILIES = (SD3, SD35M, SD35L)
# The parts only the SD3 families have (the MMDiT transformer, T5), from the families' part tables
_SD3_ONLY = sorted({p.name for p in SD3.parts if p.adaptable} - {p.name for f in (SD1, SD2, SDXL) for p in f.parts})
_SD3_NAMES = re.compile(rf"^({'|'.join(map(re.escape, _SD3_ONLY))})\.")
SD35L_WIDTH = 2432  # SD3.5 Large's joint blocks (38 heads of 64); SD3 and SD3.5 Medium's are 1536


def _sd3_from_modules(modules: dict) -> str:
    """Which SD3 family an adapter with MMDiT or T5 modules belongs to (module docstring)."""
    mmdit = {n: m for n, m in modules.items() if n.startswith(SD3.denoiser.name + ".")}
    if any(".attn2." in n for n in mmdit):
        return SD35M.name
    widths = {d for m in mmdit.values() for d in m.weight_shape[:2]}
    return SD35L.name if SD35L_WIDTH in widths else SD3.name


def family_from_modules(modules: dict) -> str | None:
    """'sdxl', 'sd1', 'sd2', 'sd1or2' (SD 1.x or 2.x, nothing shows which), an SD3 family's name ('sd3', 'sd35m',
    'sd35l'), 'sdxl_or_sd3' (CLIP modules only, a second encoder among them), or None (nothing shows the family)."""
    if any(_SD3_NAMES.match(n) for n in modules):
        return _sd3_from_modules(modules)
    parts = {n.split(".", 1)[0] for n in modules}  # CLIPs only, the second among them: SDXL's or SD3's
    if parts and parts <= set(SDXL.text_encoders) and SDXL.text_encoders[1] in parts:
        return "sdxl_or_sd3"
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
    for family in SD3_FAMILIES:  # kohya's SD3 version strings are the model types (medium, 5-medium, 5-large)
        if version == family.kohya_version or arch.split("/")[0] == family.modelspec_architecture:
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
    sd3 = tuple(f.name for f in SD3_FAMILIES)  # the modules' guess first; the metadata may name another SD3 family
    allowed = {"sd1or2": ("sd1", "sd2"), "sdxl_or_sd3": ("sdxl", *sd3)}.get(seen) or \
        ((seen, *(n for n in sd3 if n != seen)) if seen in sd3 else (seen,))
    for family, prediction in stated:
        if family.name in allowed:
            return family, prediction
    return FAMILIES[allowed[0]], "epsilon"
