"""Single-file SD 1.x / 2.x checkpoints (the original LDM layout): reading them offline, and writing them.

Reading needs no network: the package carries diffusers-format configs for SD 1.x, SD 2.x-512
(epsilon) and SD 2.x-768 (v-prediction) and the CLIP tokenizer files (`sdlora/resources/`). The
architecture comes from the keys (CLIP-L text encoder = SD 1.x, OpenCLIP = SD 2.x); the prediction
type, which no key or shape reveals, comes from, in order: `model.config_dir`'s scheduler config,
the file's `modelspec.prediction_type` metadata, ComfyUI's weight heuristic for SD 2.x, epsilon.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from sdlora.errors import UserError
from sdlora.model import ldm_keys as L
from sdlora.model.families import SD1, SD2

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


def detect_architecture(sd: dict, path: str = "checkpoint") -> str:
    """'sd_v1' (CLIP-L text encoder) or 'sd_v2' (OpenCLIP), from the keys alone."""
    if any(k.startswith("conditioner.embedders.") for k in sd):
        raise UserError(f"model.path: {path} is an SDXL checkpoint; sdlora trains SD 1.x and 2.x")
    if L.UNET + "input_blocks.0.0.weight" not in sd:
        raise UserError(f"model.path: {path} is not an SD 1.x/2.x checkpoint (no model.diffusion_model.* UNet keys)")
    if any(k.startswith(L.OPEN_CLIP) for k in sd):
        return "sd_v2"
    if any(k.startswith("cond_stage_model.transformer.") for k in sd):
        return "sd_v1"
    raise UserError(f"model.path: {path} has no text encoder (cond_stage_model.*); sdlora needs one")


def detect_prediction_type(sd: dict, meta: dict, arch: str) -> str:
    """'epsilon' or 'v_prediction' from the file's metadata, else ComfyUI's heuristic for SD 2.x, else epsilon."""
    hint = meta.get("modelspec.prediction_type") or meta.get("sdlora.prediction_type")
    if hint:
        return "v_prediction" if hint in ("v", "v_prediction") else "epsilon"
    if arch == "sd_v2":
        # The last up-block's first transformer norm1.bias spreads wider in v models (ComfyUI's rule, measured on
        # the released SD 2.x weights); it is the only weight-based signal known.
        last = max((int(k.split(".")[3]) for k in sd if k.startswith(L.UNET + "output_blocks.")), default=None)
        bias = sd.get(f"{L.UNET}output_blocks.{last}.1.transformer_blocks.0.norm1.bias")
        if bias is not None and float(torch.std(bias.float(), unbiased=False)) > 0.09:
            return "v_prediction"
    return "epsilon"


def detect_version(sd: dict, meta: dict | None = None, path: str = "checkpoint") -> str:
    """'sd_v1' | 'sd_v2' | 'sd_v2_v' (the Components.base_model_version of this checkpoint)."""
    arch = detect_architecture(sd, path)
    return family_of_architecture(arch).base_model_version(detect_prediction_type(sd, meta or {}, arch))


def family_of_architecture(arch: str):
    """The family of a single file's text-encoder architecture ('sd_v1': CLIP-L, 'sd_v2': OpenCLIP)."""
    return {"sd_v1": SD1, "sd_v2": SD2}[arch]


def _configs(version: str, config_dir: str | os.PathLike | None) -> Path:
    if config_dir is None:
        return BUNDLED_CONFIGS / version
    d = Path(os.path.expanduser(str(config_dir)))
    needed = ["unet/config.json", "vae/config.json", "text_encoder/config.json"]
    missing = [n for n in needed if not (d / n).is_file()]
    if missing:
        raise UserError(f"model.config_dir: {d} lacks {missing[0]} (a diffusers model folder's configs are needed)")
    return d


def _read_json(p: Path) -> dict:
    return json.loads(p.read_text(encoding="utf-8"))


def load_tokenizer(config_root: Path):
    """The config folder's own tokenizer files if it has them, else the bundled CLIP vocabulary."""
    from transformers import CLIPTokenizer

    tok = config_root / "tokenizer"
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


def build_text_encoder(sd: dict, config: dict, arch: str, path="checkpoint"):
    from transformers import CLIPTextConfig, CLIPTextModel

    te_config = CLIPTextConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    te = _empty(lambda: CLIPTextModel(te_config))
    keys = list(te.state_dict())
    if arch == "sd_v1":
        mapped = _mapped(lambda: L.clip_l_from_ldm(sd, keys), path, "text encoder")
    else:
        mapped = _mapped(lambda: L.open_clip_from_ldm(sd, keys, te_config.num_hidden_layers), path, "text encoder")
    return _fill(te, mapped, "text encoder", path)


def _mapped(fn, path, what):
    try:
        return fn()
    except KeyError as e:
        raise UserError(f"model.path: {path}: the {what} weight {e.args[0]} is missing; the file is not a complete "
                        "SD 1.x/2.x checkpoint of the architecture its keys suggest (for a non-standard size, set model.config_dir "
                        "to a diffusers folder of that architecture)") from None


def load_single_file(path, *, config_dir=None, allow_pickle: bool = False):
    """A single-file checkpoint as `Components` (fp32), offline."""
    from diffusers import DDPMScheduler

    from sdlora.model.components import Components

    path = Path(path)
    sd, meta = read_checkpoint(path, allow_pickle=allow_pickle)
    arch = detect_architecture(sd, str(path))
    root = _configs(arch, config_dir)
    sched_file = root / "scheduler" / "scheduler_config.json"
    sched_config = _read_json(sched_file) if sched_file.is_file() else _read_json(BUNDLED_CONFIGS / arch / "scheduler" / "scheduler_config.json")
    if config_dir is not None and sched_file.is_file():
        prediction = sched_config.get("prediction_type", "epsilon")  # the user's configs are the override
    else:
        prediction = detect_prediction_type(sd, meta, arch)
    family = family_of_architecture(arch)
    version = family.base_model_version(prediction)
    if config_dir is None:
        root = BUNDLED_CONFIGS / version
    sched_config["prediction_type"] = prediction
    unet = build_unet(sd, _read_json(root / "unet" / "config.json"), path)
    vae = build_vae(sd, _read_json(root / "vae" / "config.json"), path)
    text_encoder = build_text_encoder(sd, _read_json(root / "text_encoder" / "config.json"), arch, path)
    tokenizer = load_tokenizer(root)
    scheduler = DDPMScheduler.from_config({k: v for k, v in sched_config.items() if not k.startswith("_")})
    return Components(unet, vae, text_encoder, tokenizer, scheduler, str(path), family=family)


def load_single_file_vae(path, *, config_dir=None, allow_pickle: bool = False):
    """A VAE file: LDM layout (bare `encoder.down.*` or a full checkpoint's `first_stage_model.*`) or diffusers'."""
    from diffusers import AutoencoderKL

    path = Path(path)
    sd, _ = read_checkpoint(path, allow_pickle=allow_pickle, key="model.vae_path")
    root = _configs("sd_v1", config_dir)  # every SD 1.x/2.x release shares one VAE architecture
    config = _read_json(root / "vae" / "config.json")
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in sd:  # already diffusers' names
        vae = _empty(lambda: AutoencoderKL.from_config(config))
        return _fill(vae, {k: v for k, v in sd.items() if k in vae.state_dict()}, "VAE", path)
    prefix = L.VAE if any(k.startswith(L.VAE) for k in sd) else ""
    if prefix + "encoder.conv_in.weight" not in sd:
        raise UserError(f"model.vae_path: {path} holds no VAE weights (no encoder.conv_in.weight)")
    return build_vae(sd, config, path, prefix)


# ------------------------------------------------------------------------------------------ writing
def ldm_state_dict(unet, vae, text_encoder, version: str) -> dict[str, torch.Tensor]:
    """The original single-file layout of diffusers models (the inverse of load_single_file's mapping)."""
    sd = L.unet_to_ldm(unet.state_dict(), dict(unet.config))
    sd.update(L.vae_to_ldm(vae.state_dict(), dict(vae.config)))
    te = text_encoder.state_dict()
    if version == "sd_v1":
        sd.update(L.clip_l_to_ldm(te))
    else:
        sd.update(L.open_clip_to_ldm(te, text_encoder.config.num_hidden_layers))
    return sd


def single_file_metadata(version: str, title: str, record=None) -> dict[str, str]:
    """ModelSpec keys: from the run's `RunRecord` for a merged model (plus the record itself), else the
    defaults of `version` (a base model converted without training)."""
    from sdlora.model.families import family_of_version

    if record is not None:
        return {**record.to_metadata(), **record.modelspec_fields(title=title, lora=False)}
    family, prediction = family_of_version(version)
    return family.modelspec(prediction, title=title, lora=False)


def save_single_file(path, unet, vae, text_encoder, version: str, *, dtype=torch.float32,
                     carry: dict[str, torch.Tensor] | None = None, record=None) -> None:
    """Write an LDM-layout .safetensors atomically; `carry` adds keys the mapping does not produce
    (from a single-file source: SD 2.x's unused last text layer, text_projection, EMA, schedule buffers).
    `record` (the merged adapter's RunRecord) gives the metadata."""
    from sdlora.util.atomic import save_safetensors

    sd = ldm_state_dict(unet, vae, text_encoder, version)
    for k, v in (carry or {}).items():
        sd.setdefault(k, v)
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    save_safetensors(path, sd, metadata=single_file_metadata(version, Path(path).stem, record))
