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


@pytest.mark.parametrize("variant", ["sd3", "sd35m", "sd35l"])
def test_kohya_names_told_from_path_and_shape_are_the_config_table(variant):
    """KOHYA_NAMES needs no config (files carry none): every module's pair from its path and weight shape is the
    config's, the last block's swapped text-stream adaLN included, and each kohya name gives its pairs back."""
    model = _model(variant)
    for path, pair in mk.kohya_targets(model.config).items():
        shape = tuple(model.get_submodule(path).weight.shape)
        assert mk.KOHYA_NAMES.pair(path, shape) == pair, path
        assert pair in mk.KOHYA_NAMES.pairs(pair.original.replace(".", "_"), shape)
    assert mk.KOHYA_NAMES.pair("pos_embed.proj", (32, 16, 2, 2)).original == "x_embedder.proj"  # kohya's emb_dims
    assert mk.KOHYA_NAMES.pair("transformer_blocks.0.attn.norm_q", (8,)) is None  # a QK-norm: no kohya name
    assert [p.diffusers for p in mk.KOHYA_NAMES.pairs("joint_blocks_0_context_block_attn_qkv", (96, 32))] == \
        ["transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.attn.add_v_proj"]
    assert mk.KOHYA_NAMES.pairs("down_blocks_0_attentions_0_proj_in", (32, 32)) == []


def _delta(down, up, alpha):
    """alpha / rank · up @ down in the weight's shape (a conv LoRA: down (r, in, kh, kw), up (out, r, 1, 1))."""
    return (alpha / down.shape[0] * up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])


def _random_adapter(model, paths, rank=2, seed=0):
    """LoRA records (every scale in up) on `paths`; the ranks differ (rank, rank + 1), so a fused qkv mixes them."""
    from sdlora.adapter.records import ModuleDelta
    from sdlora.adapter.weights import AdapterWeights

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, path in enumerate(paths):
        w = model.get_submodule(path).weight
        r = rank + i % 2
        out[f"transformer.{path}"] = ModuleDelta(down=torch.randn(r, *w.shape[1:], generator=gen),  # conv: x_embedder
                                                 up=torch.randn(w.shape[0], r, *([1] * (w.dim() - 2)), generator=gen))
    return AdapterWeights(out, {"ss_base_model_version": mk.kohya_model_type(model.config)})


def test_kohya_file_applied_in_the_original_layout_by_kohyas_formula_equals_the_diffusers_lora_applied():
    """Every kohya module applied as kohya and ComfyUI apply it (W += alpha / rank · up @ down, rank = down's rows) on
    the original-layout weights equals the diffusers-layout adapter applied and then converted: q/k/v fused with
    the file's one alpha (rank 3 + 2 + 3 or 2 + 3 + 2 against alpha 2: the factors carry the rest), adaLN halves swapped."""
    from sdlora.adapter.kohya import to_kohya_state_dict

    model = _model("sd35m")
    sd = model.state_dict()
    adapter = _random_adapter(model, list(mk.kohya_targets(model.config)))
    kohya = to_kohya_state_dict(adapter)
    ranks = [adapter.modules[f"transformer.transformer_blocks.0.attn.to_{x}"].rank for x in "qkv"]
    assert kohya["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"].shape[0] == sum(ranks) > 6
    assert "lora_unet_joint_blocks_0_x_block_attn2_qkv.alpha" in kohya
    adapted = dict(sd)
    for name, m in adapter.modules.items():
        path = name.removeprefix("transformer.")
        adapted[f"{path}.weight"] = sd[f"{path}.weight"] + m.delta_weight()
    expected = mk.to_original(adapted, model.config)
    original = mk.to_original(sd, model.config)
    flat = {k.removesuffix(".weight").replace(".", "_"): k for k in original if k.endswith(".weight")}
    stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in kohya}
    for stem in stems:
        key = flat[stem.removeprefix(mk.KOHYA_PREFIX)]
        down, up = kohya[f"{stem}.lora_down.weight"], kohya[f"{stem}.lora_up.weight"]
        original[key] = original[key] + _delta(down, up, float(kohya[f"{stem}.alpha"]))
    # float32 products of N(0, 1) factors summed over ranks 2-8, values ~10: 1e-4 absolute is rounding
    assert all(torch.allclose(original[k], expected[k], atol=1e-4) for k in expected)


def test_kohya_file_reads_back_with_each_parts_rank_and_only_the_adapted_thirds():
    from sdlora.adapter.kohya import from_kohya_state_dict, to_kohya_state_dict
    from sdlora.errors import UserError

    model = _model("sd3")
    paths = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v", "transformer_blocks.1.norm1_context.linear",
             "norm_out.linear", "transformer_blocks.0.ff_context.net.2"]
    adapter = _random_adapter(model, paths, rank=3)
    back = from_kohya_state_dict(to_kohya_state_dict(adapter), {})  # no label: the names say SD3
    assert set(back.modules) == set(adapter.modules)  # to_k was not adapted and does not come back
    for name, m in adapter.modules.items():
        assert back.modules[name].rank == m.rank  # the block-diagonal fused qkv gives back each part's own rank
        assert torch.allclose(back.modules[name].delta_weight(), m.delta_weight(), atol=1e-5)
    bad = {"lora_unet_joint_blocks_0_x_block_attn_qkv_extra.lora_down.weight": torch.zeros(1, 32),
           "lora_unet_joint_blocks_0_x_block_attn_qkv_extra.lora_up.weight": torch.zeros(96, 1)}
    with pytest.raises(UserError, match="not a kohya name of SD3 Medium transformer module"):
        from_kohya_state_dict(bad, {"ss_base_model_version": "medium"})
    from sdlora.adapter.records import ModuleDelta
    from sdlora.adapter.weights import AdapterWeights

    norm = AdapterWeights({"transformer.transformer_blocks.0.attn.norm_q": ModuleDelta(down=torch.zeros(1, 8),
                                                                                      up=torch.zeros(8, 1))}, {})
    with pytest.raises(UserError, match="transformer.transformer_blocks.0.attn.norm_q has no kohya SD3 Medium name"):
        to_kohya_state_dict(norm)


def test_kohya_model_type_of_each_variant():
    types = {v: mk.kohya_model_type(tiny_sd3_transformer(v).config) for v in ("sd3", "sd35m", "sd35l")}
    assert types == {"sd3": "medium", "sd35m": "5-medium", "sd35l": "5-large"}
