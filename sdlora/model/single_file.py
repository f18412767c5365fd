"""Single-file checkpoints (the original LDM / SGM layout) of SD 1.x, 2.x and SDXL: reading them offline, and writing.
(SD3 / SD3.5 files are recognised here and read and written by model/sd3_single_file.py.)

Reading needs no network: the package carries diffusers-format configs for SD 1.x, SD 2.x-512 (epsilon),
SD 2.x-768 (v-prediction) and SDXL base 1.0, and the CLIP tokenizer files (`sdlora/resources/`). The family
comes from the keys (`ModelFamily.matches_single_file`: CLIP-L = SD 1.x, OpenCLIP = SD 2.x, both under
`conditioner.embedders` = SDXL). The prediction type, which no weight shape reveals, comes from, in order: what the
file says of itself (the `v_pred` marker key of SDXL v-prediction files, with `ztsnr` for zero terminal SNR, as
ComfyUI reads them; else its `modelspec.prediction_type` metadata), `model.config_dir`'s scheduler config,
ComfyUI's weight heuristic for SD 2.x, epsilon. `model.prediction_type` / `model.zero_terminal_snr` override all.

SD 1.x/2.x files are read by sdlora's own mapping (`ldm_keys`, the inverse of the writer; pinned against
diffusers' converters in the tests). SDXL files are read by diffusers' own single-file converters
(`UNet2DConditionModel.from_single_file` etc.), pointed at the bundled configs so that nothing is downloaded.
Writing uses `ldm_keys` for every family: diffusers has no converter to the original layout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from sdlora.errors import UserError
from sdlora.model import ldm_keys as L
from sdlora.model.families import FAMILIES, SUPPORTED

RESOURCES = Path(__file__).resolve().parent.parent / "resources"
BUNDLED_CONFIGS = RESOURCES / "configs"
CLIP_TOKENIZER = RESOURCES / "clip_tokenizer"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


# ------------------------------------------------------------------------------------------ reading
def read_checkpoint(path: Path, *, allow_pickle: bool, key: str = "model.path") -> tuple[dict, dict]:
    """(state dict, safetensors metadata). Pickle files only with allow_pickle: unpickling runs code."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise UserError(
                f"{key}: {path.name} is a pickle checkpoint, and loading one can run arbitrary code; convert it to "
                ".safetensors (e.g. load it once in a trusted environment and save with safetensors.torch.save_file) "
                "or set model.allow_pickle: true if you trust the file")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise UserError(f"{key}: {path} could not be unpickled ({type(e).__name__})") from None
        sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
        if not isinstance(sd, dict):
            raise UserError(f"{key}: {path} holds no state dict")
        meta = {"sdlora.global_step": str(obj.get("global_step"))} if isinstance(obj, dict) and "global_step" in obj else {}
        return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}, meta
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"{key}: {path.name}: allowed single files are .safetensors (or .ckpt with model.allow_pickle)")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise UserError(f"{key}: {path} is not a readable safetensors file ({type(e).__name__})") from None
    return sd, meta


def detect_family(sd: dict, path: str = "checkpoint"):
    """The model family of a single file, from its keys alone (`ModelFamily.matches_single_file`)."""
    from sdlora.model.sd3_single_file import is_sd3_file

    if is_sd3_file(sd) or any(k.startswith("joint_blocks.") for k in sd):
        return _sd3_family(sd, path)
    if L.UNET + "input_blocks.0.0.weight" not in sd:
        raise UserError(f"model.path: {path} is not an SD 1.x, 2.x or SDXL checkpoint (no model.diffusion_model.* "
                        "UNet keys)")
    for family in FAMILIES.values():
        if family.matches_single_file(sd):
            return family
    if any(k.startswith("conditioner.embedders.0.model.") for k in sd):  # OpenCLIP bigG alone: the refiner
        raise UserError(f"model.path: {path} is an SDXL refiner checkpoint (one OpenCLIP text encoder); {SUPPORTED}: "
                        "the SDXL base model and its fine-tunes")
    if any(k.startswith("conditioner.embedders.") for k in sd):
        raise UserError(f"model.path: {path} is an SDXL checkpoint without both of its text encoders (CLIP-L under "
                        f"{L.SDXL_CLIP_L.removesuffix('text_model.')}*, OpenCLIP bigG under {L.SDXL_OPEN_CLIP}*)")
    raise UserError(f"model.path: {path} has no text encoder (cond_stage_model.* or conditioner.embedders.*); "
                    "sdlora needs one")


def _sd3_family(sd: dict, path: str):
    """The SD3-family instance of an SD3 / SD3.5 file (`SD3Family.matches_single_file`: its keys' QK-norm and dual
    attention); a bare MMDiT (no `model.diffusion_model.` prefix, no VAE: ComfyUI's diffusion_models files) is refused."""
    if not any(k.startswith(L.UNET + "joint_blocks.") for k in sd):
        raise UserError(f"model.path: {path} is a transformer-only SD3 / SD3.5 file (MMDiT keys without "
                        f"{L.UNET}, no VAE); sdlora reads full SD3 checkpoints (MMDiT under {L.UNET}, VAE under "
                        f"{L.VAE}) or diffusers folders")
    return next(f for f in FAMILIES.values() if f.matches_single_file(sd))


def detect_architecture(sd: dict, path: str = "checkpoint") -> str:
    """The family's bundled-config name for epsilon prediction: 'sd_v1', 'sd_v2' or 'sdxl_base_v1-0'."""
    return detect_family(sd, path).base_model_version("epsilon")


def detect_prediction_type(sd: dict, meta: dict, arch: str) -> str:
    """'epsilon' or 'v_prediction' as the file states it (`stated_prediction`), else ComfyUI's heuristic for SD 2.x,
    else epsilon."""
    stated = stated_prediction(sd, meta)
    if stated is not None:
        return stated[0]
    if arch == "sd_v2":
        # The last up-block's first transformer norm1.bias spreads wider in v models (ComfyUI's rule, measured on
        # the released SD 2.x weights); it is the only weight-based signal known.
        last = max((int(k.split(".")[3]) for k in sd if k.startswith(L.UNET + "output_blocks.")), default=None)
        bias = sd.get(f"{L.UNET}output_blocks.{last}.1.transformer_blocks.0.norm1.bias")
        if bias is not None and float(torch.std(bias.float(), unbiased=False)) > 0.09:
            return "v_prediction"
    return "epsilon"


def stated_prediction(sd: dict, meta: dict) -> tuple[str, bool | None] | None:
    """(prediction type, zero terminal SNR or None where unsaid) as the file states it of itself: the `v_pred` marker
    key (with `ztsnr`, zero terminal SNR: the pair ComfyUI reads), else its `modelspec.prediction_type` /
    `sdlora.prediction_type` metadata (and a merged sdlora file's `sdlora.zero_terminal_snr`); None when it
    says nothing (weights alone do not show it)."""
    if L.V_PRED_KEY in sd:
        return "v_prediction", L.ZTSNR_KEY in sd
    hint = meta.get("modelspec.prediction_type") or meta.get("sdlora.prediction_type")
    if not hint:
        return None
    ztsnr = meta.get("sdlora.zero_terminal_snr")  # a merged file of an sdlora run states its schedule too
    return ("v_prediction" if hint in ("v", "v_prediction") else "epsilon"), \
        (None if ztsnr is None else ztsnr == "True")


def detect_version(sd: dict, meta: dict | None = None, path: str = "checkpoint") -> str:
    """'sd_v1' | 'sd_v2' | 'sd_v2_v' | 'sdxl_base_v1-0' (the Components.base_model_version of this checkpoint)."""
    arch = detect_architecture(sd, path)
    return family_of_architecture(arch).base_model_version(detect_prediction_type(sd, meta or {}, arch))


def family_of_architecture(arch: str):
    """The family of a bundled-config name for epsilon prediction (`detect_architecture`)."""
    return next(f for f in FAMILIES.values() if f.base_model_version("epsilon") == arch)


def _configs(version: str, config_dir: str | os.PathLike | None, parts: tuple[str, ...]) -> Path:
    """The folder of configs for a single file: `config_dir` (which must hold each of `parts`' config.json),
    else the bundled ones of `version`."""
    if config_dir is None:
        return BUNDLED_CONFIGS / version
    d = Path(os.path.expanduser(str(config_dir)))
    needed = [f"{part}/config.json" for part in parts]
    missing = [n for n in needed if not (d / n).is_file()]
    if missing:
        raise UserError(f"model.config_dir: {d} lacks {missing[0]} (a diffusers model folder's configs are needed)")
    return d


def _read_json(p: Path) -> dict:
    return json.loads(p.read_text(encoding="utf-8"))


def load_tokenizer(config_root: Path, subfolder: str = "tokenizer"):
    """The config folder's own tokenizer files if it has them, else the bundled CLIP vocabulary with the folder's
    special tokens (the pad token differs: SD 1.x's and SDXL's first tokenizer pad with end-of-text, SD 2.x's
    and SDXL's second with `!`, id 0)."""
    from transformers import CLIPTokenizer

    tok = config_root / subfolder
    if (tok / "vocab.json").is_file():
        return CLIPTokenizer.from_pretrained(tok, local_files_only=True)
    settings = _read_json(tok / "special_tokens_map.json") if (tok / "special_tokens_map.json").is_file() else {}
    return CLIPTokenizer(str(CLIP_TOKENIZER / "vocab.json"), str(CLIP_TOKENIZER / "merges.txt"), model_max_length=77,
                         **{k: v for k, v in settings.items() if k in ("bos_token", "eos_token", "unk_token", "pad_token")})


def _empty(build):
    from accelerate import init_empty_weights

    with init_empty_weights():
        return build()


def _fill(model, sd: dict, what: str, path) -> "torch.nn.Module":
    try:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"model.path: {path}: the {what} weights do not fit its config ({first[:200]}); "
                        "set model.config_dir to a diffusers folder of this architecture") from None
    return model.eval()


def build_unet(sd: dict, config: dict, path="checkpoint"):
    from diffusers import UNet2DConditionModel

    unet = _empty(lambda: UNet2DConditionModel.from_config(config))
    keys = list(unet.state_dict())
    return _fill(unet, _mapped(lambda: L.unet_from_ldm(sd, config, keys), path, "UNet"), "UNet", path)


def build_vae(sd: dict, config: dict, path="checkpoint", prefix: str = L.VAE):
    from diffusers import AutoencoderKL

    vae = _empty(lambda: AutoencoderKL.from_config(config))
    keys = list(vae.state_dict())
    return _fill(vae, _mapped(lambda: L.vae_from_ldm(sd, config, keys, prefix), path, "VAE"), "VAE", path)


def build_text_encoder(sd: dict, config: dict, layout: str, path="checkpoint", prefix: str | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel

    te_config = CLIPTextConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    te = _empty(lambda: CLIPTextModel(te_config))
    keys = list(te.state_dict())
    prefix = prefix or (L.CLIP_L if layout == "clip_l" else L.OPEN_CLIP)
    mapped = _mapped(lambda: L.text_encoder_from_ldm(layout, sd, keys, te_config.num_hidden_layers, prefix), path,
                     "text encoder")
    return _fill(te, mapped, "text encoder", path)


def _mapped(fn, path, what):
    try:
        return fn()
    except KeyError as e:
        raise UserError(f"model.path: {path}: the {what} weight {e.args[0]} is missing; the file is not a complete "
                        "SD 1.x/2.x checkpoint of the architecture its keys suggest (for a non-standard size, set model.config_dir "
                        "to a diffusers folder of that architecture)") from None


def load_single_file(path, *, config_dir=None, allow_pickle: bool = False, text_encoders_path=None):
    """A single-file checkpoint as `Components` (fp32), offline. The noise schedule is the file's: its prediction
    type (see the module docstring) and, for an SDXL file with the `ztsnr` marker, zero terminal SNR. SD3 / SD3.5
    files: model/sd3_single_file.py (`text_encoders_path`: where the text encoders the file lacks come from)."""
    import diffusers

    from sdlora.model.components import Components
    from sdlora.model.sd3 import SD3Family

    path = Path(path)
    sd, meta = read_checkpoint(path, allow_pickle=allow_pickle)
    family = detect_family(sd, str(path))
    if isinstance(family, SD3Family):
        from sdlora.model.sd3_single_file import read_sd3_single_file

        if path.suffix.lower() != ".safetensors":
            raise UserError(f"model.path: {path} is an SD3 / SD3.5 checkpoint in a pickle file; sdlora reads SD3 "
                            "files as .safetensors only (as Stability publishes them)")
        models, tokenizers, scheduler = read_sd3_single_file(path, sd, family, clip_tokenizer=load_tokenizer,
                                                             config_dir=config_dir,
                                                             text_encoders_path=text_encoders_path)
        return Components(family, models, tokenizers, scheduler, str(path))
    if text_encoders_path is not None:
        raise UserError(f"model.text_encoders_path: for an SD3 / SD3.5 single file only; {path} is {family.title}, "
                        "whose file holds its text encoders")
    arch = family.base_model_version("epsilon")
    root = _configs(arch, config_dir, tuple(p.name for p in family.parts))
    sched_file = root / "scheduler" / "scheduler_config.json"
    sched_config = _read_json(sched_file) if sched_file.is_file() else _read_json(BUNDLED_CONFIGS / arch / "scheduler" / "scheduler_config.json")
    stated = stated_prediction(sd, meta)  # what the file says of itself wins over a config folder's default
    if stated is not None:
        prediction, zero_snr = stated
        if zero_snr is not None:
            sched_config["rescale_betas_zero_snr"] = zero_snr
    elif config_dir is not None and sched_file.is_file():
        prediction = sched_config.get("prediction_type", "epsilon")  # the user's configs, over the heuristics
    else:
        prediction = detect_prediction_type(sd, meta, arch)
    version = family.base_model_version(prediction)
    if config_dir is None:
        root = BUNDLED_CONFIGS / version
    sched_config["prediction_type"] = prediction
    read = _read_with_diffusers if family.single_file_reader == "diffusers" else _read_with_sdlora
    models = read(sd, root, family, path)
    tokenizers = {p.name: load_tokenizer(root, p.tokenizer) for p in family.text_encoder_parts}
    scheduler = getattr(diffusers, family.scheduler_class).from_config(
        {k: v for k, v in sched_config.items() if not k.startswith("_")})
    return Components(family, models, tokenizers, scheduler, str(path))


def _read_with_sdlora(sd: dict, root: Path, family, path) -> dict:
    """UNet, VAE and text encoders through sdlora's own mapping (ldm_keys), strict: a missing weight is named."""
    denoiser, vae = family.denoiser.name, family.vae.name
    models = {denoiser: build_unet(sd, _read_json(root / denoiser / "config.json"), path),
              vae: build_vae(sd, _read_json(root / vae / "config.json"), path)}
    for component, layout, prefix in family.ldm_text_encoders:
        models[component] = build_text_encoder(sd, _read_json(root / component / "config.json"), layout, path, prefix)
    return models


def _read_with_diffusers(sd: dict, root: Path, family, path) -> dict:
    """UNet, VAE and text encoders through diffusers' single-file converters (what `from_single_file` runs), with
    `root`'s configs, offline; every parameter must come from the file (diffusers would leave a missing one empty)."""
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    index = _read_json(root / "model_index.json") if (root / "model_index.json").is_file() else {}
    for part in family.parts:  # the parts table picks each class; a configs folder that says otherwise is refused
        entry = index.get(part.name)
        named = entry[1] if isinstance(entry, list) and len(entry) == 2 else entry
        if named is not None and named != part.model_class.rpartition(".")[2]:
            raise UserError(f"model.config_dir: {root / 'model_index.json'} names {named!r} as {part.name}; "
                            f"{family.title}'s {part.name} is {part.model_class.rpartition('.')[2]}")
    models = {}
    try:
        for part in (family.denoiser, family.vae):
            models[part.name] = part.build_class().from_single_file(sd, config=str(root), subfolder=part.name,
                                                                    local_files_only=True, torch_dtype=torch.float32)
        for part in family.text_encoder_parts:
            models[part.name] = create_diffusers_clip_model_from_ldm(part.build_class(), sd, subfolder=part.name,
                                                                     config=str(root), local_files_only=True,
                                                                     torch_dtype=torch.float32)
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model.path: {path}: diffusers could not read it as {family.title} with the configs in {root} "
                        f"({first[:200]}); for a non-standard size, set model.config_dir to a diffusers folder of "
                        "that architecture") from None
    for name, model in models.items():
        empty = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta"]
        if empty:
            raise UserError(f"model.path: {path}: the {name} weight {empty[0]} is missing ({len(empty)} in all); the "
                            f"file is not a complete {family.title} checkpoint")
    return {name: model.float().eval() for name, model in models.items()}


def load_single_file_vae(path, *, config_dir=None, allow_pickle: bool = False, base_config: dict | None = None):
    """A VAE file: LDM layout (bare `encoder.down.*` or a full checkpoint's `first_stage_model.*`) or diffusers'.
    A file has no config: it takes the base model's VAE config (`base_config`; every SD 1.x/2.x/SDXL VAE has one
    architecture, and the latent scaling factor, 0.18215 or SDXL's 0.13025, belongs to the model it serves)."""
    from diffusers import AutoencoderKL

    path = Path(path)
    sd, _ = read_checkpoint(path, allow_pickle=allow_pickle, key="model.vae_path")
    if base_config is not None:
        config = {k: v for k, v in dict(base_config).items() if not k.startswith("_")}
    else:
        config = _read_json(_configs("sd_v1", config_dir, ("vae",)) / "vae" / "config.json")
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in sd:  # already diffusers' names
        vae = _empty(lambda: AutoencoderKL.from_config(config))
        return _fill(vae, {k: v for k, v in sd.items() if k in vae.state_dict()}, "VAE", path)
    prefix = L.VAE if any(k.startswith(L.VAE) for k in sd) else ""
    if prefix + "encoder.conv_in.weight" not in sd:
        raise UserError(f"model.vae_path: {path} holds no VAE weights (no encoder.conv_in.weight)")
    return build_vae(sd, config, path, prefix)


# ------------------------------------------------------------------------------------------ writing
def ldm_state_dict(comps) -> dict[str, torch.Tensor]:
    """The original single-file layout of the loaded models (the inverse of the reading mapping): each text encoder
    in its family's layout and prefix, and the family's marker keys (an SDXL v-prediction file's `v_pred`)."""
    family = comps.family
    from sdlora.model.sd3 import SD3Family

    if isinstance(family, SD3Family):
        from sdlora.model.sd3_single_file import sd3_state_dict

        return sd3_state_dict(comps)
    sd = L.unet_to_ldm(comps.unet.state_dict(), dict(comps.unet.config))  # the SD families' UNet layout
    sd.update(L.vae_to_ldm(comps.vae.state_dict(), dict(comps.vae.config)))
    for component, layout, prefix in family.ldm_text_encoders:
        te = comps.text_encoders[component]
        sd.update(L.text_encoder_to_ldm(layout, te.state_dict(), te.config.num_hidden_layers, prefix))
    sd.update(family.single_file_markers(comps.prediction_type, comps.zero_terminal_snr))
    return sd


def single_file_metadata(family, prediction_type: str, title: str, record=None) -> dict[str, str]:
    """ModelSpec keys: from the run's `RunRecord` for a merged model (plus the record itself), else those of the
    model's family and prediction type (a base model converted without training; SDXL's version string does not
    tell v-prediction apart)."""
    if record is not None:
        return {**record.to_metadata(), **record.modelspec_fields(title=title, lora=False)}
    return {**family.modelspec(prediction_type, title=title, lora=False), "sdlora.format": "merged-single-file"}


def save_single_file(path, comps, *, dtype=torch.float32, carry: dict[str, torch.Tensor] | None = None,
                     record=None) -> None:
    """Write `comps` (any family) as an LDM-layout .safetensors atomically; `carry` adds keys the mapping does not
    produce (from a single-file source: SD 2.x's unused last text layer, text_projection, EMA, schedule buffers,
    SDXL bigG's logit_scale). `record` (the merged adapter's RunRecord) gives the metadata."""
    from sdlora.util.atomic import save_safetensors

    sd = ldm_state_dict(comps)
    for k, v in (carry or {}).items():
        sd.setdefault(k, v)
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    save_safetensors(path, sd, metadata=single_file_metadata(comps.family, comps.prediction_type, Path(path).stem,
                                                             record))
