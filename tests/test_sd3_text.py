"""SD3 conditioning (model/sd3_text.py) equals StableDiffusion3Pipeline.encode_prompt on the tiny models: with and
without T5, any T5 length, clip skip; and the pipeline's unconditional input (what caption dropout must give) is the
encoded empty string, not zeros."""

import pytest
import torch

from sdlora.model.sd3_text import SD3Tokens, encode_sd3, tokenize_sd3
from sdlora.model.tiny_sd3 import TINY_SD3_CLIP_G, TINY_SD3_CLIP_L, TINY_SD3_T5

CAPTIONS = ["a red circle", "a photo of the blue square on a white background, painting style"]


@pytest.fixture(scope="module")
def pipes(tiny_sd3, tiny_sd3_no_t5, tiny_sd35m):
    from diffusers import StableDiffusion3Pipeline

    return {"sd3": StableDiffusion3Pipeline.from_pretrained(tiny_sd3),
            "sd35m": StableDiffusion3Pipeline.from_pretrained(tiny_sd35m),
            "no_t5": StableDiffusion3Pipeline.from_pretrained(tiny_sd3_no_t5, text_encoder_3=None, tokenizer_3=None)}


def _ours(pipe, captions, t5_max_length, clip_skip=None):
    tokens = tokenize_sd3(captions, pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3, t5_max_length)
    with torch.no_grad():
        return encode_sd3(tokens, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3,
                          joint_attention_dim=pipe.transformer.config.joint_attention_dim,
                          t5_max_length=t5_max_length, clip_skip=clip_skip)


@pytest.mark.parametrize("name, t5_max_length, clip_skip", [("sd3", 16, None), ("sd35m", 77, None),
                                                             ("sd3", 32, 1), ("no_t5", 24, None)])
def test_conditioning_equals_the_pipelines_encode_prompt(pipes, name, t5_max_length, clip_skip):
    pipe = pipes[name]
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(CAPTIONS, None, None, do_classifier_free_guidance=False,
                                                  max_sequence_length=t5_max_length, clip_skip=clip_skip)
    ours_embeds, ours_pooled = _ours(pipe, CAPTIONS, t5_max_length, clip_skip)
    # The same modules on the same ids in the same order on one CPU thread: bit-identical, no tolerance needed.
    assert torch.equal(ours_embeds, embeds) and torch.equal(ours_pooled, pooled)
    assert embeds.shape == (2, 77 + t5_max_length, TINY_SD3_T5) and pooled.shape == (2, TINY_SD3_CLIP_L + TINY_SD3_CLIP_G)


def test_layout_clip_features_padded_then_t5_tokens(pipes):
    embeds, pooled = _ours(pipes["sd3"], CAPTIONS, 16)
    clip_width = TINY_SD3_CLIP_L + TINY_SD3_CLIP_G
    assert torch.all(embeds[:, :77, clip_width:] == 0) and embeds[:, :77, :clip_width].abs().sum() > 0
    assert embeds[:, 77:].abs().sum() > 0  # T5's tokens (present)
    no_t5, _ = _ours(pipes["no_t5"], CAPTIONS, 16)
    assert torch.all(no_t5[:, 77:] == 0) and no_t5[:, :77, :clip_width].abs().sum() > 0


def test_unconditional_input_is_the_encoded_empty_caption_not_zeros(pipes):
    pipe = pipes["sd3"]
    with torch.no_grad():
        _, negative, _, negative_pooled = pipe.encode_prompt(CAPTIONS, None, None, do_classifier_free_guidance=True,
                                                             max_sequence_length=16)
    empty, empty_pooled = _ours(pipe, ["", ""], 16)
    assert torch.equal(negative, empty) and torch.equal(negative_pooled, empty_pooled)
    assert negative_pooled.abs().sum() > 0  # so caption dropout must encode "", not feed zeros


def test_t5_ids_are_required_when_t5_is_present(pipes):
    pipe = pipes["sd3"]
    tokens = tokenize_sd3(CAPTIONS, pipe.tokenizer, pipe.tokenizer_2, None)
    assert isinstance(tokens, SD3Tokens) and tokens.t5 is None
    with pytest.raises(ValueError, match="no T5 token ids"):
        encode_sd3(tokens, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, joint_attention_dim=96)


def test_mixed_dtypes_follow_the_pipelines_casts(tiny_sd3):
    from diffusers import StableDiffusion3Pipeline

    # CLIP-L in bf16, CLIP-G and T5 in fp32: both CLIP outputs take CLIP-L's dtype, T5's keeps its own, and the
    # joined tensor is whatever torch.cat promotes them to, in the pipeline and here alike
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    pipe.text_encoder.to(torch.bfloat16)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(CAPTIONS, None, None, do_classifier_free_guidance=False,
                                                  max_sequence_length=16)
    ours_embeds, ours_pooled = _ours(pipe, CAPTIONS, 16)
    assert ours_embeds.dtype == embeds.dtype and ours_pooled.dtype == pooled.dtype
    assert torch.equal(ours_embeds, embeds) and torch.equal(ours_pooled, pooled)
