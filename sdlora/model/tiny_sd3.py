"""Tiny SD3 / SD3.5 models: the `StableDiffusion3Pipeline` folder layout with random weights and tokenizers built
here, so SD3 tests run offline in seconds.

The shapes follow diffusers' own fast tests (`tests/pipelines/stable_diffusion_3/test_pipeline_stable_diffusion_3.py`,
`get_dummy_components`: head dim 8, 4 heads) with the real models' structure kept where it matters to a trainer:

- `sd3`: SD3 Medium's structure (`SD3Transformer2DModel`, patch 2, no QK-norm, no dual attention), 2 joint blocks so
  that both an ordinary block and the last, context-pre-only block exist.
- `sd35m`: SD3.5 Medium's: `qk_norm="rms_norm"` and dual attention (`attn2`) in the first blocks
  (`dual_attention_layers`, 0-12 of 24 in the real model; 0-1 of 3 here).
- `sd35l`: SD3.5 Large's: `qk_norm="rms_norm"`, no dual attention.
- `sd3-no-t5`: `sd3` without `text_encoder_3` / `tokenizer_3` (the pipeline then feeds zeros in T5's place).

Widths (unequal, so a swapped or mis-sliced encoder fails loudly): CLIP-L 32, CLIP-G 48 (their projections equal
their widths, as in the real 768 / 1280), T5 96 (> 32 + 48, so the CLIP features are zero-padded as the real
2048 -> 4096 are). VAE: 16 latent channels, no quant convs, SD3's shift 0.0609 and scale 1.5305.
Scheduler: `FlowMatchEulerDiscreteScheduler(shift=3.0)` as in SD3 checkpoints.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from sdlora.errors import UserError
from sdlora.model.loading import _quiet_loaders
from sdlora.model.tiny import _TINY_WORDS, _randomise, write_tiny_tokenizer

TINY_SD3_VARIANTS = ("sd3", "sd3-no-t5", "sd35m", "sd35l")

TINY_SD3_CLIP_L, TINY_SD3_CLIP_G, TINY_SD3_T5 = 32, 48, 96
TINY_SD3_HEADS, TINY_SD3_HEAD_DIM = 4, 8
TINY_SD3_SHIFT_FACTOR, TINY_SD3_SCALING_FACTOR = 0.0609, 1.5305  # SD3's VAE config

# variant -> (joint blocks, dual attention layers, qk_norm, T5 present)
_STRUCTURE = {
    "sd3": (2, (), None, True),
    "sd3-no-t5": (2, (), None, False),
    "sd35m": (3, (0, 1), "rms_norm", True),
    "sd35l": (3, (), "rms_norm", True),
}


def write_tiny_t5_tokenizer(folder: Path):
    """A T5 tokenizer built from scratch: a small Unigram vocabulary (SentencePiece's "▁" word marker, the letters,
    digits and some punctuation with and without it, a few whole caption words) in transformers' `T5TokenizerFast`
    (which is tokenizers-backed: `tokenizer.json` is written, no SentencePiece model). Ids 0, 1, 2 are
    `<pad>`, `</s>`, `<unk>` as in T5; the end-of-sequence token is appended as T5 does. Returns the tokenizer."""
    from transformers import T5TokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -3.0) for w in _TINY_WORDS if len(w) > 1]  # whole words score above their spellings
    vocab += [("▁" + c, -6.0) for c in chars] + [(c, -7.0) for c in chars]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    return tokenizer


def _clip_encoder(hidden: int, act: str, pad_id: int, vocab_size: int, bos_id: int, eos_id: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, hidden_act=act, projection_dim=hidden,
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id))


def _t5_encoder(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    # T5 v1.1's structure (gated GELU, as T5-XXL), 2 layers.
    return T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=TINY_SD3_T5, d_kv=8, d_ff=2 * TINY_SD3_T5, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, is_encoder_decoder=False,
        use_cache=False, tie_word_embeddings=False))


def tiny_sd3_transformer(variant: str = "sd3"):
    """The tiny `SD3Transformer2DModel` of a variant (default initialisation; `make_tiny_sd3` randomises it)."""
    from diffusers import SD3Transformer2DModel

    layers, dual, qk_norm, _ = _STRUCTURE[variant]
    inner = TINY_SD3_HEADS * TINY_SD3_HEAD_DIM
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=layers,
        attention_head_dim=TINY_SD3_HEAD_DIM, num_attention_heads=TINY_SD3_HEADS,
        joint_attention_dim=TINY_SD3_T5, caption_projection_dim=inner,
        pooled_projection_dim=TINY_SD3_CLIP_L + TINY_SD3_CLIP_G, pos_embed_max_size=16,
        dual_attention_layers=dual, qk_norm=qk_norm)


def tiny_sd3_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 16, 16, 16), sample_size=64, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=TINY_SD3_SHIFT_FACTOR, scaling_factor=TINY_SD3_SCALING_FACTOR,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def make_tiny_sd3(out_dir: str | os.PathLike, seed: int = 0, variant: str = "sd3") -> Path:
    """Write a tiny SD3-family diffusers folder (see the module docstring for the variants); loadable offline by
    `StableDiffusion3Pipeline.from_pretrained`. Default image size 64 px (latents 8 x 8, 4 x 4 patches).
    Raises UserError for an unknown variant."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer

    if variant not in TINY_SD3_VARIANTS:
        raise UserError(f"tiny SD3 model variant {variant!r}: allowed {', '.join(TINY_SD3_VARIANTS)}")
    _quiet_loaders()
    out = Path(out_dir)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    with_t5 = _STRUCTURE[variant][3]

    write_tiny_tokenizer(out / "tokenizer")
    write_tiny_tokenizer(out / "tokenizer_2", pad_token="!")  # OpenCLIP bigG pads with "!" (id 0), as kohya's SD3
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(out / "tokenizer_2")
    ids = dict(vocab_size=len(tokenizer), bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id)
    text_encoder = _clip_encoder(TINY_SD3_CLIP_L, "quick_gelu", tokenizer.pad_token_id, **ids)
    text_encoder_2 = _clip_encoder(TINY_SD3_CLIP_G, "gelu", tokenizer_2.pad_token_id, **ids)
    tokenizer_3 = write_tiny_t5_tokenizer(out / "tokenizer_3") if with_t5 else None
    text_encoder_3 = _t5_encoder(len(tokenizer_3)) if with_t5 else None

    transformer, vae = tiny_sd3_transformer(variant), tiny_sd3_vae()
    encoders = (text_encoder, text_encoder_2) + ((text_encoder_3,) if with_t5 else ())
    _randomise((transformer, vae), encoders, gen)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    pipe.save_pretrained(out, safe_serialization=True)
    return out
