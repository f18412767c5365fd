"""Base model parts: loading them (diffusers folder or single file), and the tiny model factory.

The tiny model has SD 1.x's (or SD 2.x's) block structure with random weights and a self-made
byte-level CLIP tokenizer, so tests and the demo run offline in seconds.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError

MODEL_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# What from_pretrained raises on a damaged or foreign folder (a truncated safetensors file is a SafetensorError).
LOAD_ERRORS = (OSError, ValueError, TypeError, KeyError, RuntimeError, AttributeError)
try:
    from safetensors import SafetensorError

    LOAD_ERRORS += (SafetensorError,)
except ImportError:  # older safetensors: its error is a subclass of the above
    pass


@dataclass
class Components:
    unet: "torch.nn.Module"
    vae: "torch.nn.Module"
    text_encoder: "torch.nn.Module"
    tokenizer: object
    noise_scheduler: object  # DDPMScheduler built from the model's scheduler config
    source: str  # what was loaded, for metadata
    base_model_version: str = "sd_v1"  # sd_v1 | sd_v2 | sd_v2_v

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type


def _quiet_loaders():
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (path / "model_index.json").is_file() and (path / "unet").is_dir()


def load_components(model_path: str, *, vae_path: str | None = None, config_dir: str | None = None,
                    allow_pickle: bool = False, prediction_type: str | None = None) -> Components:
    """Load UNet, VAE, text encoder, tokenizer and a DDPM noise scheduler, offline, in fp32.

    `prediction_type` (model.prediction_type) overrides what the model's configs or metadata say."""
    _quiet_loaders()
    path = Path(os.path.expanduser(model_path))
    if not path.exists():
        raise UserError(f"model.path: no such file or folder: {path}")
    if path.is_dir():
        comps = _load_diffusers_folder(path)
    else:
        from .formats.single_file import load_single_file

        comps = load_single_file(path, config_dir=config_dir, allow_pickle=allow_pickle)
    if vae_path:
        comps.vae = load_vae(vae_path, config_dir=config_dir, allow_pickle=allow_pickle)
        latent = comps.unet.config.in_channels
        if comps.vae.config.latent_channels != latent:
            raise UserError(f"model.vae_path: {vae_path} makes {comps.vae.config.latent_channels}-channel latents; "
                            f"the model's UNet takes {latent} (an SD 1.x/2.x VAE is needed)")
    if prediction_type and prediction_type != comps.prediction_type:
        set_prediction_type(comps, prediction_type)
    return comps


def set_prediction_type(comps: Components, prediction_type: str) -> None:
    """The noise scheduler (so the training target), and for SD 2.x the version exports record, follow it."""
    sched = comps.noise_scheduler
    comps.noise_scheduler = type(sched).from_config(sched.config, prediction_type=prediction_type)
    if comps.base_model_version != "sd_v1":
        comps.base_model_version = "sd_v2_v" if prediction_type == "v_prediction" else "sd_v2"


def _load_diffusers_folder(path: Path) -> Components:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if not is_diffusers_folder(path):
        raise UserError(f"model.path: {path} is not a diffusers model folder (no model_index.json with a unet/ subfolder)")
    check_family(path)
    missing = [p for p in MODEL_PARTS if not (path / p).is_dir()]
    if missing:
        raise UserError(f"model.path: {path} lacks the subfolder(s) {', '.join(missing)} (needed: {', '.join(MODEL_PARTS)})")
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
    except LOAD_ERRORS as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model.path: {path} could not be loaded: {first[:300]}") from None
    check_unet(unet, vae, path)
    return Components(unet, vae, text_encoder, tokenizer, scheduler, str(path), base_model_version=_guess_version(unet, scheduler))


SUPPORTED = "sdlora trains SD 1.x and SD 2.x (StableDiffusionPipeline) models"


def _json_or_empty(p: Path) -> dict:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def check_family(path: Path) -> None:
    """Refuse, before any weight loads, a diffusers folder of a family sdlora cannot train (SDXL first of all:
    it loads, then its UNet fails at the first step asking for added_cond_kwargs)."""
    index = _json_or_empty(path / "model_index.json")
    unet_cfg = _json_or_empty(path / "unet" / "config.json")
    pipeline = str(index.get("_class_name", ""))
    if "XL" in pipeline or "text_encoder_2" in index or unet_cfg.get("addition_embed_type") == "text_time":
        raise UserError(f"model.path: {path} is an SDXL model ({pipeline or 'text_encoder_2 / text_time UNet'}); "
                        f"{SUPPORTED}; SDXL is not supported yet")
    if unet_cfg.get("addition_embed_type") or unet_cfg.get("class_embed_type"):
        kind = unet_cfg.get("addition_embed_type") or unet_cfg.get("class_embed_type")
        raise UserError(f"model.path: {path} is a {pipeline or 'UNet'} with extra conditioning ({kind}); {SUPPORTED}")


def check_unet(unet, vae, where) -> None:
    """A UNet whose input is not the VAE's latent (inpainting: 9 channels, an upscaler: 7) cannot train here."""
    latent = vae.config.latent_channels
    if unet.config.in_channels != latent or unet.config.out_channels != latent:
        raise UserError(f"model.path: {where}: its UNet takes {unet.config.in_channels} input channels, the VAE "
                        f"gives {latent} (an inpainting or upscaling model?); {SUPPORTED} with {latent}-channel UNets")


def _guess_version(unet, scheduler) -> str:
    if unet.config.cross_attention_dim == 1024 or unet.config.use_linear_projection:
        return "sd_v2_v" if scheduler.config.prediction_type == "v_prediction" else "sd_v2"
    return "sd_v1"


def load_vae(vae_path: str, *, config_dir: str | None = None, allow_pickle: bool = False):
    from diffusers import AutoencoderKL

    p = Path(os.path.expanduser(vae_path))
    if not p.exists():
        raise UserError(f"model.vae_path: no such file or folder: {p}")
    if p.is_dir():
        sub = "vae" if (p / "vae").is_dir() else None
        try:
            return AutoencoderKL.from_pretrained(p, subfolder=sub, local_files_only=True)
        except LOAD_ERRORS as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"model.vae_path: {p} could not be loaded as a VAE: {first[:300]}") from None
    from .formats.single_file import load_single_file_vae

    return load_single_file_vae(p, config_dir=config_dir, allow_pickle=allow_pickle)


# ------------------------------------------------------------------------------------------ tiny model
def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's byte-to-unicode table, as the 256 symbols a byte-level BPE vocabulary starts with."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


# A few merges so that common caption words are single tokens (keeps token counts realistic).
_TINY_WORDS = ["a", "photo", "of", "the", "red", "blue", "green", "circle", "square", "cat", "dog", "painting",
               "style", "on", "background", "with", "and", "in", "sks", "person", "white", "black", "yellow"]


def write_tiny_tokenizer(folder: Path) -> None:
    """A CLIP tokenizer built from scratch: byte symbols, their end-of-word forms, merges for a few words."""
    symbols = _byte_symbols()
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    known = set(vocab_list)
    for word in _TINY_WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            a, b = parts[0], parts[1]
            merged = a + b
            if f"{a} {b}" not in merges:
                merges.append(f"{a} {b}")
            if merged not in known:
                vocab_list.append(merged)
                known.add(merged)
            parts = [merged] + parts[2:]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "clean_up_tokenization_spaces": True, **special}), encoding="utf-8")


TINY_VARIANTS = ("sd1", "sd2", "sd2-v")


def make_tiny_model(out_dir: str | os.PathLike, seed: int = 0, variant: str = "sd1") -> Path:
    """Write a tiny diffusers SD folder with random weights; loadable by StableDiffusionPipeline.from_pretrained.

    sd1: SD 1.x layout (conv 1x1 proj_in/out, CLIP quick_gelu); sd2: SD 2.x layout (linear proj_in/out,
    gelu, per-block head counts), epsilon; sd2-v: sd2 with v-prediction.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if variant not in TINY_VARIANTS:
        raise UserError(f"tiny model variant {variant!r}: allowed {', '.join(TINY_VARIANTS)}")
    _quiet_loaders()
    out = Path(out_dir)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    sd2 = variant.startswith("sd2")
    te_hidden = 64 if sd2 else 48

    tok_dir = out / "tokenizer"
    write_tiny_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)

    te_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=te_hidden, intermediate_size=2 * te_hidden, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu" if sd2 else "quick_gelu",
        projection_dim=te_hidden, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = CLIPTextModel(te_config)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 32, 64, 64), norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=te_hidden,
        attention_head_dim=(2, 4, 4, 4) if sd2 else 8,
        use_linear_projection=sd2,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 16, 16, 16), sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    with torch.no_grad():
        for model in (unet, vae, text_encoder):
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05 if p.dim() > 1 else p)
        # A trained CLIP's layer norms are not (1, 0); with (1, 0) every output token of the final layer norm
        # has norm exactly sqrt(hidden), and embedding-norm measurements on the tiny model would be meaningless.
        for m in text_encoder.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(torch.exp(torch.randn(m.weight.shape, generator=gen) * 0.5))
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.3)

    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
        prediction_type="v_prediction" if variant == "sd2-v" else "epsilon",
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out
