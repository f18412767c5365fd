"""The MMDiT name map (model/mmdit_keys.py) against diffusers' single-file converter on the tiny SD3, SD3.5 Medium
and SD3.5 Large transformers, and the kohya / ComfyUI LoRA names and fused-qkv LoRA maths built on it."""

import pytest
import torch

from sdlora.model import mmdit_keys as mk
from sdlora.model.tiny_sd3 import tiny_sd3_transformer


def _model(variant):
    torch.manual_seed(0)
    model = tiny_sd3_transformer(variant)
    with torch.no_grad():  # distinct values everywhere, so a swapped or misplaced tensor cannot compare equal
        for p in model.parameters():
            p.copy_(torch.randn(p.shape))
    return model


@pytest.mark.parametrize("variant", ["sd3", "sd35m", "sd35l"])
def test_original_layout_converts_back_through_diffusers_converter(variant):
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    model = _model(variant)
    sd = model.state_dict()
    original = mk.to_original(sd, model.config, prefix=mk.SINGLE_FILE_PREFIX)
    checkpoint = dict(original)
    converted = convert_sd3_transformer_checkpoint_to_diffusers(checkpoint)
    assert checkpoint == {}  # the converter consumed (popped) every original key we wrote: no extra, none misnamed
    assert converted.keys() == sd.keys() and all(torch.equal(converted[k], sd[k]) for k in sd)
    back = mk.from_original(original, model.config, prefix=mk.SINGLE_FILE_PREFIX)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_a_config_that_does_not_match_the_weights_is_refused():
    model = _model("sd35m")
    config = dict(model.config, dual_attention_layers=())
    with pytest.raises(ValueError, match="no original name: transformer_blocks.0.attn2"):
        mk.to_original(model.state_dict(), config)


def test_kohya_names_are_comfyui_names_of_original_weights():
    model = _model("sd35m")
    original = mk.to_original(model.state_dict(), model.config, prefix="diffusion_model.")
    # ComfyUI's model_lora_keys_unet: "lora_unet_" + (key without "diffusion_model." and ".weight"), dots -> "_"
    comfy = {"lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")
             for k in original if k.endswith(".weight")}
    targets = mk.kohya_targets(model.config)
    names = {mk.kohya_name(p.original) for p in targets.values()}
    assert names <= comfy
    assert mk.kohya_name(targets["transformer_blocks.0.attn.to_k"].original) == "lora_unet_joint_blocks_0_x_block_attn_qkv"
    assert mk.kohya_name(targets["transformer_blocks.1.attn2.to_out.0"].original) == \
        "lora_unet_joint_blocks_1_x_block_attn2_proj"
    assert mk.kohya_name(targets["norm_out.linear"].original) == "lora_unet_final_layer_adaLN_modulation_1"
    kohya_default = {p.diffusers for p in targets.values() if mk.is_kohya_default_target(p.original)}
    assert "transformer_blocks.2.ff_context.net.0.proj" not in targets  # the last block's text stream has no MLP
    assert {"transformer_blocks.0.norm1_context.linear", "transformer_blocks.0.ff.net.2",
            "transformer_blocks.0.attn.add_v_proj"} <= kohya_default and "context_embedder" not in kohya_default


# rank 4 each: equal scales 0.5 keep alpha / rank = 0.5 at rank 12; unequal scales are folded in, alpha = rank
@pytest.mark.parametrize("alphas, fused_alpha", [((2.0, 2.0, 2.0), 6.0), ((4.0, 2.0, 8.0), 12.0)])
def test_fused_qkv_lora_is_the_three_deltas_stacked(alphas, fused_alpha):
    gen = torch.Generator().manual_seed(0)
    parts = [(torch.randn(4, 32, generator=gen), torch.randn(32, 4, generator=gen), a) for a in alphas]
    down, up, alpha = mk.fuse_qkv_lora(parts)
    fused_delta = alpha / down.shape[0] * up @ down
    stacked = torch.cat([a / d.shape[0] * u @ d for d, u, a in parts], dim=0)
    assert torch.allclose(fused_delta, stacked, rtol=1e-5, atol=1e-5)  # float32 sums of 4-12 products of N(0,1)
    assert alpha == fused_alpha
    for (d, u, a), (d3, u3, a3) in zip(parts, mk.split_qkv_lora(down, up, alpha)):
        assert torch.allclose(a3 / d3.shape[0] * u3 @ d3, a / d.shape[0] * u @ d, rtol=1e-5, atol=1e-5)


def test_fused_lora_applied_in_original_layout_equals_per_module_deltas_in_diffusers():
    model = _model("sd3")
    sd = model.state_dict()
    gen = torch.Generator().manual_seed(1)
    parts = [(torch.randn(2, 32, generator=gen), torch.randn(32, 2, generator=gen), 1.0) for _ in range(3)]
    down, up, alpha = mk.fuse_qkv_lora(parts)
    original = mk.to_original(sd, model.config)
    original["joint_blocks.0.context_block.attn.qkv.weight"] = (
        original["joint_blocks.0.context_block.attn.qkv.weight"] + alpha / down.shape[0] * up @ down)
    # the final adaLN: a delta on diffusers' (scale, shift) rows lands on the original's (shift, scale) rows
    d_norm = torch.randn(64, 32, generator=gen)
    original["final_layer.adaLN_modulation.1.weight"] += mk.swap_halves(d_norm)
    back = mk.from_original(original, model.config)
    for (d, u, a), name in zip(parts, ("add_q_proj", "add_k_proj", "add_v_proj")):
        key = f"transformer_blocks.0.attn.{name}.weight"
        assert torch.allclose(back[key], sd[key] + a / d.shape[0] * u @ d, atol=1e-5)
    assert torch.allclose(back["norm_out.linear.weight"], sd["norm_out.linear.weight"] + d_norm, atol=1e-6)


def _delta(down, up, alpha):
    return alpha / down.shape[0] * up @ down


def _random_loras(model, paths, rank=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, path in enumerate(paths):
        w = model.get_submodule(path).weight
        out[path] = (torch.randn(rank, w.shape[1], generator=gen), torch.randn(w.shape[0], rank, generator=gen),
                     float(rank if i % 2 else 2 * rank))  # scales 1 and 2: q/k/v parts of unequal scale too
    return out


def test_kohya_lora_applied_in_the_original_layout_equals_the_diffusers_lora_applied():
    model = _model("sd35m")
    sd = model.state_dict()
    loras = _random_loras(model, list(mk.kohya_targets(model.config)))
    kohya = mk.lora_to_kohya(loras, model.config)
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv" in kohya and "lora_unet_joint_blocks_0_x_block_attn2_qkv" in kohya
    adapted = dict(sd)
    for path, lora in loras.items():
        adapted[f"{path}.weight"] = sd[f"{path}.weight"] + _delta(*lora)
    expected = mk.to_original(adapted, model.config)
    original = mk.to_original(sd, model.config)
    for name, lora in kohya.items():
        key = name[len(mk.KOHYA_PREFIX):]
        key = next(k for k in original if k.replace(".", "_") == f"{key}_weight")
        original[key] = original[key] + _delta(*lora)
    # float32 products of N(0, 1) factors summed over ranks 2-6, values ~10: 1e-4 absolute is rounding
    assert all(torch.allclose(original[k], expected[k], atol=1e-4) for k in expected)


def test_kohya_lora_reads_back_with_each_parts_rank_and_only_the_adapted_thirds():
    model = _model("sd3")
    paths = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v", "transformer_blocks.1.norm1_context.linear",
             "norm_out.linear", "transformer_blocks.0.ff_context.net.2"]
    loras = _random_loras(model, paths, rank=3)
    back = mk.lora_from_kohya(mk.lora_to_kohya(loras, model.config), model.config)
    assert set(back) == set(paths)  # to_k was not adapted and does not come back
    for path in paths:
        assert back[path][0].shape[0] == 3  # the block-diagonal fused qkv gives back each part's own rank
        assert torch.allclose(_delta(*back[path]), _delta(*loras[path]), atol=1e-5)
    with pytest.raises(ValueError, match="lora_unet_joint_blocks_9_x_block_attn_qkv: not a kohya SD3 LoRA name"):
        mk.lora_from_kohya({"lora_unet_joint_blocks_9_x_block_attn_qkv": back[paths[0]]}, model.config)
    with pytest.raises(ValueError, match="pos_embed.proj: no kohya SD3 LoRA name"):
        mk.lora_to_kohya({"pos_embed.proj": back[paths[0]]}, model.config)


def test_kohya_model_type_of_each_variant():
    types = {v: mk.kohya_model_type(tiny_sd3_transformer(v).config) for v in ("sd3", "sd35m", "sd35l")}
    assert types == {"sd3": "medium", "sd35m": "5-medium", "sd35l": "5-large"}
