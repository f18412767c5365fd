"""Single-file SD3 / SD3.5 checkpoints (Stability's original layout, as `StableDiffusion3Pipeline.from_single_file`,
ComfyUI and kohya-ss read them): reading them offline, and writing.

The layout (diffusers `loaders/single_file_utils.py`; kohya `library/sd3_utils.py`):

  model.diffusion_model.*               the MMDiT in its original names (model/mmdit_keys.py)
  first_stage_model.*                   the VAE in the LDM names (model/ldm_keys.py)
  text_encoders.clip_l.transformer.*    CLIP-L, transformers' own names (its text_projection may be absent: identity)
  text_encoders.clip_g.transformer.*    CLIP-G (OpenCLIP bigG), transformers' own names
  text_encoders.t5xxl.transformer.*     T5-XXL, transformers' own names (Stability ships it in fp8 in one file)

The text encoders are optional in a file: `sd3_medium.safetensors` and `sd3.5_large.safetensors` hold none,
`sd3_medium_incl_clips.safetensors` both CLIPs, `..._incl_clips_t5xxlfp8.safetensors` all three. An encoder the file
lacks comes from `model.text_encoders_path` (a diffusers SD3 / SD3.5 folder); without it a file lacking a CLIP is
refused in one line, and a file lacking T5 gives a T5-less model (the pipeline then feeds zeros in T5's place).
The variant comes from the keys (kohya's rule, mmdit_keys.kohya_model_type): QK-norm (`ln_q`) with dual attention
(`x_block.attn2`) is SD3.5 Medium, QK-norm alone SD3.5 Large, neither SD3 Medium; the depth is the number of joint
blocks. Configs: `model.config_dir`, else the bundled ones of the variant (`SD3Family.bundled_configs`:
`sdlora/resources/configs/sd3_medium`, `sd3.5_medium`, `sd3.5_large`: transformer, VAE, CLIP-L, CLIP-G, T5, CLIP
tokenizers, scheduler). No T5 tokenizer is bundled: a file holding T5 needs `tokenizer_3` from
`model.text_encoders_path` or `model.config_dir`. Only `.safetensors` files are read (model/single_file.py refuses a
pickle SD3 file). This module sits below model/single_file.py, which builds the `Components`.

Reading uses diffusers' converters (`from_single_file` with the configs folder, `create_diffusers_clip_model_from_ldm`,
`create_diffusers_t5_model_from_checkpoint`); only CLIP-L's projection is the file's where it has one (diffusers
always sets identity; kohya reads the file's). Writing: the MMDiT by `mmdit_keys.to_original`, the VAE by
`ldm_keys.vae_to_ldm`, the encoders' state dicts under their prefixes (T5's tied input embedding under both of
its names, `shared.weight` and `encoder.embed_tokens.weight`: diffusers' T5 reader leaves the second empty when it is
absent; sdlora ties it to the first).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from sdlora.errors import LOAD_ERRORS, UserError
from sdlora.model import ldm_keys as L
from sdlora.model import mmdit_keys as M

TEXT_PREFIXES = {"text_encoder": "text_encoders.clip_l.transformer.", "text_encoder_2": "text_encoders.clip_g.transformer.",
                 "text_encoder_3": "text_encoders.t5xxl.transformer."}
TEXT_NAMES = {"text_encoder": "CLIP-L", "text_encoder_2": "CLIP-G", "text_encoder_3": "T5-XXL"}
# the weight that says an encoder is in the file (diffusers' CHECKPOINT_KEY_NAMES and is_t5_in_single_file)
_MARKERS = {"text_encoder": "text_model.embeddings.position_embedding.weight",
            "text_encoder_2": "text_model.embeddings.position_embedding.weight", "text_encoder_3": "shared.weight"}
_T5_TIED = "encoder.embed_tokens.weight"  # T5's input embedding, the same tensor as shared.weight


def is_sd3_file(keys) -> bool:
    return any(k.startswith(M.SINGLE_FILE_PREFIX + "joint_blocks.") for k in keys)


def mmdit_structure(keys) -> dict:
    """The transformer-config facts the keys show (kohya's `analyze_state_dict_state`): `num_layers` (joint blocks),
    `dual_attention_layers` (blocks with `x_block.attn2`), `qk_norm` ("rms_norm" where `ln_q` weights exist)."""
    prefix = M.SINGLE_FILE_PREFIX + "joint_blocks."
    blocks, dual, qk = set(), set(), False
    for k in keys:
        if k.startswith(prefix):
            n, _, rest = k[len(prefix):].partition(".")
            if n.isdigit():
                blocks.add(int(n))
                dual |= {int(n)} if rest.startswith("x_block.attn2.") else set()
                qk = qk or ".ln_q." in rest
    return {"num_layers": max(blocks) + 1 if blocks else 0, "dual_attention_layers": tuple(sorted(dual)),
            "qk_norm": "rms_norm" if qk else None}


def text_encoders_in(keys) -> tuple[str, ...]:
    """The text-encoder parts (`text_encoder`, `text_encoder_2`, `text_encoder_3`) whose weights the file holds."""
    return tuple(p for p, prefix in TEXT_PREFIXES.items() if prefix + _MARKERS[p] in keys)


def _folder(value, key: str) -> Path:
    p = Path(os.path.expanduser(str(value)))
    if not p.is_dir():
        raise UserError(f"{key}: {p} is not a folder (a diffusers SD3 / SD3.5 model folder is needed)")
    return p


def _config_root(family, config_dir) -> Path:
    if config_dir is None:
        return family.bundled_configs()
    root = _folder(config_dir, "model.config_dir")
    for sub in ("transformer", "vae"):
        if not (root / sub / "config.json").is_file():
            raise UserError(f"model.config_dir: {root} lacks {sub}/config.json (a diffusers SD3 / SD3.5 folder's "
                            "configs are needed)")
    return root


def read_sd3_single_file(path, sd: dict, family, *, clip_tokenizer, config_dir=None, text_encoders_path=None):
    """An SD3 / SD3.5 single file (`sd`, read from `path`; `family` its SD3Family) as (models by part name, fp32;
    tokenizers by text-encoder part; the training scheduler), offline; see the module docstring for where each part
    comes from. `clip_tokenizer(config_root, subfolder)` builds a CLIP tokenizer from a configs folder
    (model/single_file.load_tokenizer). Raises UserError (one line) naming a part that is missing or does not fit."""
    import diffusers

    path = Path(path)
    if not any(k.startswith(L.VAE) for k in sd):
        raise UserError(f"model.path: {path} is an {family.title} file without its VAE (no {L.VAE}* keys); sdlora "
                        "reads SD3 files with their VAE, as Stability publishes them")
    root = _config_root(family, config_dir)
    donor = _folder(text_encoders_path, "model.text_encoders_path") if text_encoders_path else None
    inside = text_encoders_in(sd)
    from_donor = [p for p in TEXT_PREFIXES if p not in inside and donor is not None and (donor / p).is_dir()]
    for part in ("text_encoder", "text_encoder_2"):
        if part not in inside and part not in from_donor:
            where = (f"{donor} has no {part}/ either" if donor else
                     "set model.text_encoders_path to a diffusers SD3 / SD3.5 folder holding text_encoder/ and "
                     "text_encoder_2/ (e.g. a local copy of stabilityai/stable-diffusion-3.5-medium)")
            raise UserError(f"model.path: {path} holds no {TEXT_NAMES[part]} ({TEXT_PREFIXES[part]}*); {where}")
    models = _read_file_parts(sd, root, family, path, inside)
    tokenizers = {}
    for part in family.text_encoder_parts:
        if part.name in from_donor:
            models[part.name], tokenizers[part.name] = _from_donor(donor, part)
        elif part.name in inside:
            tokenizers[part.name] = _tokenizer(part, root, donor, path, clip_tokenizer)
    sched_file = root / "scheduler" / "scheduler_config.json"
    if not sched_file.is_file():
        sched_file = family.bundled_configs() / "scheduler" / "scheduler_config.json"
    sched_config = json.loads(sched_file.read_text(encoding="utf-8"))
    scheduler = getattr(diffusers, family.scheduler_class).from_config(
        {k: v for k, v in sched_config.items() if not k.startswith("_")})
    return models, tokenizers, scheduler


def _read_file_parts(sd: dict, root: Path, family, path, inside) -> dict:
    """The transformer, the VAE and the file's text encoders through diffusers' converters; each parameter must come
    from the file."""
    from diffusers.loaders.single_file_utils import (create_diffusers_clip_model_from_ldm,
                                                     create_diffusers_t5_model_from_checkpoint)

    models, parts = {}, {p.name: p for p in family.parts}
    try:
        for name in ("transformer", "vae"):  # diffusers' SD3 converter pops what it reads: give each a copy
            models[name] = parts[name].build_class().from_single_file(
                dict(sd), config=str(root), subfolder=name, local_files_only=True, torch_dtype=torch.float32)
        for name in inside:
            _needs_config(root, name)
            make = create_diffusers_t5_model_from_checkpoint if name == "text_encoder_3" else \
                create_diffusers_clip_model_from_ldm
            models[name] = make(parts[name].build_class(), dict(sd), subfolder=name, config=str(root),
                                local_files_only=True, torch_dtype=torch.float32)
    except (ValueError, KeyError, RuntimeError, OSError, IndexError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model.path: {path}: diffusers could not read it as {family.title} with the configs in "
                        f"{root} ({first[:200]}); for a non-standard size, set model.config_dir to a diffusers folder "
                        "of that architecture") from None
    projection = TEXT_PREFIXES["text_encoder"] + "text_projection.weight"
    if "text_encoder" in models and projection in sd:  # the file's own CLIP-L projection (diffusers sets identity)
        te = models["text_encoder"]
        if tuple(sd[projection].shape) != tuple(te.text_projection.weight.shape):
            raise UserError(f"model.path: {path}: {projection} has shape {tuple(sd[projection].shape)}, CLIP-L's "
                            f"projection is {tuple(te.text_projection.weight.shape)}")
        te.text_projection.weight = torch.nn.Parameter(sd[projection].float(), requires_grad=False)
    if "text_encoder_3" in models:  # one tensor for T5's input embedding, as transformers ties it
        t5 = models["text_encoder_3"]
        if t5.encoder.embed_tokens.weight.device.type == "meta":
            t5.encoder.embed_tokens = t5.shared
    for name, model in models.items():
        empty = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta"]
        if empty:
            raise UserError(f"model.path: {path}: the {name} weight {empty[0]} is missing ({len(empty)} in all); the "
                            f"file is not a complete {family.title} checkpoint")
    return {name: model.float().eval() for name, model in models.items()}


def _needs_config(root: Path, name: str) -> None:
    if not (root / name / "config.json").is_file():
        raise UserError(f"model.config_dir: {root} lacks {name}/config.json, and the file holds {TEXT_NAMES[name]}")


def _from_donor(donor: Path, part):
    """A text encoder and its tokenizer from model.text_encoders_path (safetensors weights only)."""
    if not (donor / part.tokenizer).is_dir():
        raise UserError(f"model.text_encoders_path: {donor} has {part.name}/ but no {part.tokenizer}/")
    try:
        model = part.build_class().from_pretrained(donor, subfolder=part.name, local_files_only=True,
                                                   use_safetensors=True)
        tokenizer = part.tokenizer_type().from_pretrained(donor, subfolder=part.tokenizer, local_files_only=True)
    except LOAD_ERRORS as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model.text_encoders_path: {donor}/{part.name} could not be loaded: {first[:300]}") from None
    return model.float().eval(), tokenizer


def _tokenizer(part, root: Path, donor: Path | None, path, clip_tokenizer):
    """The tokenizer of an encoder read from the file: CLIP's from the configs (`clip_tokenizer`); T5's from
    model.text_encoders_path, else model.config_dir (none is bundled)."""
    if part.name != "text_encoder_3":
        return clip_tokenizer(root, part.tokenizer)
    for folder in (donor, root):
        if folder is not None and (folder / part.tokenizer).is_dir():
            return part.tokenizer_type().from_pretrained(folder, subfolder=part.tokenizer, local_files_only=True)
    raise UserError(f"model.path: {path} holds T5-XXL, and sdlora bundles no T5 tokenizer; set "
                    "model.text_encoders_path (or model.config_dir) to a diffusers SD3 / SD3.5 folder holding "
                    "tokenizer_3/")


# ------------------------------------------------------------------------------------------ writing
def sd3_state_dict(comps) -> dict[str, torch.Tensor]:
    """The loaded SD3 model in the original single-file layout (the module docstring): every part it has."""
    transformer = comps.denoiser
    sd = M.to_original(transformer.state_dict(), dict(transformer.config), prefix=M.SINGLE_FILE_PREFIX)
    sd.update(L.vae_to_ldm(comps.vae.state_dict(), dict(comps.vae.config)))
    for name, te in comps.text_encoders.items():
        own = te.state_dict()
        if name == "text_encoder_3" and _T5_TIED in own:  # tied to shared.weight; diffusers reads both keys
            own[_T5_TIED] = own[_T5_TIED].clone()
        sd.update({TEXT_PREFIXES[name] + k: v for k, v in own.items()})
    return sd
