"""The tiny models: SD 1.x's (or SD 2.x's) block structure with random weights and a self-made byte-level CLIP
tokenizer, so tests and the demo's machinery run offline in seconds."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from sdlora.errors import UserError
from sdlora.model.loading import _quiet_loaders


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


def write_tiny_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> None:
    """A CLIP tokenizer built from scratch: byte symbols, their end-of-word forms, merges for a few words.
    `pad_token="!"` makes SDXL's second tokenizer (OpenCLIP pads with "!", id 0, not with end-of-text)."""
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
               "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "clean_up_tokenization_spaces": True, **special}), encoding="utf-8")


TINY_VARIANTS = ("sd1", "sd2", "sd2-v", "sdxl", "sdxl-v")  # SD3 / SD3.5: model/tiny_sd3.py


def make_tiny_model(out_dir: str | os.PathLike, seed: int = 0, variant: str = "sd1") -> Path:
    """Write a tiny diffusers SD folder with random weights; loadable by StableDiffusionPipeline.from_pretrained.

    sd1: SD 1.x layout (conv 1x1 proj_in/out, CLIP quick_gelu); sd2: SD 2.x layout (linear proj_in/out,
    gelu, per-block head counts), epsilon; sd2-v: sd2 with v-prediction.
    """
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if variant not in TINY_VARIANTS:
        raise UserError(f"tiny model variant {variant!r}: allowed {', '.join(TINY_VARIANTS)}")
    _quiet_loaders()
    if variant.startswith("sdxl"):
        return make_tiny_sdxl(out_dir, seed=seed, v_prediction=variant == "sdxl-v")
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
    _randomise((unet, vae), (text_encoder,), gen)
    scheduler = _tiny_scheduler("v_prediction" if variant == "sd2-v" else "epsilon")
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def _tiny_vae(scaling_factor: float = 0.18215):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 16, 16, 16), sample_size=64, scaling_factor=scaling_factor,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )


def _tiny_scheduler(prediction_type: str):
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )


def _randomise(models, text_encoders, gen: torch.Generator) -> None:
    with torch.no_grad():
        for model in (*models, *text_encoders):
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05 if p.dim() > 1 else p)
        # A trained CLIP's layer norms are not (1, 0); with (1, 0) every output token of the final layer norm
        # has norm exactly sqrt(hidden), and embedding-norm measurements on the tiny model would be meaningless.
        for text_encoder in text_encoders:
            for m in text_encoder.modules():
                if isinstance(m, torch.nn.LayerNorm):
                    m.weight.copy_(torch.exp(torch.randn(m.weight.shape, generator=gen) * 0.5))
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.3)


# Tiny SDXL widths: CLIP-L stand-in 32, bigG stand-in 48 (unequal, so a swapped or mis-sliced encoder fails
# loudly), projection 40, micro-conditioning embedding 8 per number: 6 x 8 + 40 = 88 into add_embedding.
TINY_SDXL_TE1, TINY_SDXL_TE2, TINY_SDXL_PROJECTION, TINY_SDXL_TIME_DIM = 32, 48, 40, 8


def make_tiny_sdxl(out_dir: str | os.PathLike, seed: int = 0, v_prediction: bool = False) -> Path:
    """A tiny diffusers SDXL folder (StableDiffusionXLPipeline layout): SDXL's block structure (two layers per block,
    no attention in the first down block, so SDXL's original block names are those of the real model; linear proj_in/out, transformer depth growing with depth, text_time micro-conditioning),
    CLIPTextModel + CLIPTextModelWithProjection, the second tokenizer padding with "!"."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    _quiet_loaders()
    out = Path(out_dir)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    write_tiny_tokenizer(out / "tokenizer")
    write_tiny_tokenizer(out / "tokenizer_2", pad_token="!")
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(out / "tokenizer_2")

    def te_config(hidden, act, projection, pad_id):
        return CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=77, hidden_act=act, projection_dim=projection,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id)

    text_encoder = CLIPTextModel(te_config(TINY_SDXL_TE1, "quick_gelu", TINY_SDXL_TE1, tokenizer.pad_token_id))
    text_encoder_2 = CLIPTextModelWithProjection(te_config(TINY_SDXL_TE2, "gelu", TINY_SDXL_PROJECTION,
                                                           tokenizer_2.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=8,  # SDXL's blocks
        block_out_channels=(32, 32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8), use_linear_projection=True,
        cross_attention_dim=TINY_SDXL_TE1 + TINY_SDXL_TE2, addition_embed_type="text_time",
        addition_time_embed_dim=TINY_SDXL_TIME_DIM,
        projection_class_embeddings_input_dim=6 * TINY_SDXL_TIME_DIM + TINY_SDXL_PROJECTION,
    )
    vae = _tiny_vae(scaling_factor=0.13025)  # SDXL's VAE scaling factor
    _randomise((unet, vae), (text_encoder, text_encoder_2), gen)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=_tiny_scheduler("v_prediction" if v_prediction else "epsilon"),
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out
