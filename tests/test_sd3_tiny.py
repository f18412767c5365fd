"""The tiny SD3 / SD3.5 models (model/tiny_sd3.py): real diffusers folders that StableDiffusion3Pipeline loads offline
and samples from, with each variant's structure (dual attention, QK-norm, T5 or none) as in the real models."""

import json

import numpy as np
import pytest
import torch

from sdlora.cli import main as cli_main
from sdlora.model.tiny_sd3 import TINY_SD3_CLIP_G, TINY_SD3_CLIP_L, TINY_SD3_T5


def _load(folder):
    from diffusers import StableDiffusion3Pipeline

    # A folder whose model_index.json names no T5 (text_encoder_3: [null, null], what save_pretrained writes for a
    # T5-less pipeline) loads only when the caller says so: diffusers 0.42 treats the T5 slots as required.
    no_t5 = json.loads((folder / "model_index.json").read_text())["text_encoder_3"][0] is None
    return StableDiffusion3Pipeline.from_pretrained(folder, **(dict(text_encoder_3=None, tokenizer_3=None) if no_t5
                                                                  else {}))


@pytest.mark.parametrize("fixture", ["tiny_sd3", "tiny_sd3_no_t5", "tiny_sd35m", "tiny_sd35l"])
def test_each_variant_loads_offline_and_samples(fixture, request):
    pipe = _load(request.getfixturevalue(fixture))
    image = pipe("a red circle", num_inference_steps=2, output_type="np", max_sequence_length=16,
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all() and image.std() > 0.01  # an image, not a constant (random weights: std ~0.1)


def test_variants_have_the_real_models_structure(tiny_sd3, tiny_sd3_no_t5, tiny_sd35m, tiny_sd35l):
    from diffusers.models.normalization import RMSNorm

    sd3, sd35m, sd35l = _load(tiny_sd3), _load(tiny_sd35m), _load(tiny_sd35l)
    for pipe in (sd3, sd35m, sd35l):
        assert pipe.vae.config.latent_channels == 16 and pipe.vae.config.shift_factor == pytest.approx(0.0609)
        assert pipe.scheduler.config.shift == 3.0
        assert pipe.transformer.config.joint_attention_dim == pipe.text_encoder_3.config.d_model == TINY_SD3_T5
        assert pipe.transformer.config.pooled_projection_dim == TINY_SD3_CLIP_L + TINY_SD3_CLIP_G
        assert pipe.transformer.transformer_blocks[-1].context_pre_only  # the last block's text stream ends early
    with_attn2 = [i for i, b in enumerate(sd35m.transformer.transformer_blocks) if b.attn2 is not None]
    assert with_attn2 == [0, 1] and not any(b.attn2 is not None for b in sd35l.transformer.transformer_blocks)
    assert isinstance(sd35m.transformer.transformer_blocks[0].attn.norm_q, RMSNorm)
    assert isinstance(sd35l.transformer.transformer_blocks[0].attn.norm_added_k, RMSNorm)
    assert sd3.transformer.transformer_blocks[0].attn.norm_q is None
    no_t5 = _load(tiny_sd3_no_t5)
    assert no_t5.text_encoder_3 is None and no_t5.tokenizer_3 is None


def test_t5_tokenizer_is_built_locally_and_ends_with_eos(tiny_sd3):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_sd3 / "tokenizer_3")
    ids = tok("a red circle xq", padding="max_length", max_length=10).input_ids
    assert tok.convert_ids_to_tokens(ids[:5]) == ["▁a", "▁red", "▁circle", "▁x", "q"]
    assert ids[5:] == [tok.eos_token_id] + [tok.pad_token_id] * 4 and (tok.pad_token_id, tok.eos_token_id) == (0, 1)


def test_cli_writes_a_tiny_sd35m(tmp_path):
    assert cli_main(["make-tiny-model", str(tmp_path / "m"), "--variant", "sd35m"]) == 0
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["transformer"][1] == "SD3Transformer2DModel"
    config = json.loads((tmp_path / "m" / "transformer" / "config.json").read_text())
    assert config["dual_attention_layers"] == [0, 1] and config["qk_norm"] == "rms_norm"
