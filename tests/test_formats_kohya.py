"""Kohya layout: names, round trip, reading other trainers' files (alpha != rank), metadata and hashes."""

import hashlib
import json

import pytest
import torch
from safetensors import safe_open

from sdlora.adapter.io import load_adapter
from sdlora.adapter.weights import AdapterWeights, ModuleDelta
from sdlora.errors import UserError
from sdlora.adapter.kohya import canonical_from_kohya, from_kohya_state_dict, kohya_name, save_kohya, to_kohya_state_dict
from sdlora.model.families import SD1

NAMES = {
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q":
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0":
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0",
    "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj":
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj",
    "unet.down_blocks.1.attentions.1.proj_in": "lora_unet_down_blocks_1_attentions_1_proj_in",
    "unet.up_blocks.1.resnets.0.conv_shortcut": "lora_unet_up_blocks_1_resnets_0_conv_shortcut",
    "unet.down_blocks.2.resnets.1.time_emb_proj": "lora_unet_down_blocks_2_resnets_1_time_emb_proj",
    "unet.down_blocks.0.downsamplers.0.conv": "lora_unet_down_blocks_0_downsamplers_0_conv",
    "text_encoder.encoder.layers.11.self_attn.out_proj": "lora_te_text_model_encoder_layers_11_self_attn_out_proj",
    "text_encoder.encoder.layers.3.mlp.fc2": "lora_te_text_model_encoder_layers_3_mlp_fc2",
}


@pytest.mark.parametrize("canonical, kohya", list(NAMES.items()))
def test_kohya_names_both_ways_without_a_model(canonical, kohya):
    assert kohya_name(canonical, SD1) == kohya
    assert canonical_from_kohya(kohya) == canonical


def _random_adapter(seed=0) -> AdapterWeights:
    g = torch.Generator().manual_seed(seed)
    shapes = {  # name -> (down shape, up shape)
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": ((4, 32), (32, 4)),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0": ((8, 32), (32, 8)),
        "unet.down_blocks.0.resnets.0.conv1": ((2, 32, 3, 3), (32, 2, 1, 1)),
        "text_encoder.encoder.layers.0.self_attn.q_proj": ((4, 48), (48, 4)),
    }
    mods = {n: ModuleDelta(torch.randn(d, generator=g), torch.randn(u, generator=g), scale=0.7, alpha=2.8,
                           trained_rank=d[0]) for n, (d, u) in shapes.items()}
    return AdapterWeights(mods, {"sdlora.base_model": "/models/sd15", "sdlora.steps": "10"})


def test_kohya_round_trip_keeps_every_delta_exactly():
    adapter = _random_adapter()
    sd = to_kohya_state_dict(adapter)
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in sd)
    back = from_kohya_state_dict(sd, {})
    assert set(back.modules) == set(adapter.modules)
    for n, m in adapter.modules.items():
        # One alpha for the file (the network dim, rank 4) and r / alpha in the factors; with ranks 2, 4, 8 the
        # factors 1/2 and 2 are exact in floating point, so the round trip is bit for bit.
        assert float(sd[kohya_name(n, SD1) + ".alpha"]) == 4.0
        assert torch.equal(back.modules[n].delta_weight(), m.delta_weight()), n


def test_reading_another_trainers_file_folds_alpha_over_rank_into_up():
    g = torch.Generator().manual_seed(1)
    down, up = torch.randn(8, 32, generator=g), torch.randn(32, 8, generator=g)
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    sd = {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(2.0)}
    m = from_kohya_state_dict(sd, {}).modules["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"]
    torch.testing.assert_close(m.delta_weight(), (2.0 / 8) * up @ down, rtol=1e-6, atol=1e-6)
    assert m.alpha == 2.0 and m.scale == 0.25
    no_alpha = from_kohya_state_dict({k: v for k, v in sd.items() if not k.endswith(".alpha")}, {})
    torch.testing.assert_close(next(iter(no_alpha.modules.values())).delta_weight(), up @ down)


@pytest.mark.parametrize("key, match", [
    ("lora_unet_down_blocks_0_attentions_0_proj_in.hada_t1", "not a LoRA or LyCORIS key sdlora reads .*Tucker"),
    ("lora_te9_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", "not a LoRA or LyCORIS key"),
    ("lora_unet_some_block_0_thing.lora_down.weight", "not a module path"),
])
def test_unsupported_kohya_keys_are_user_errors(key, match):
    with pytest.raises(UserError, match=match):
        from_kohya_state_dict({key: torch.zeros(2, 2), key.replace("down", "up"): torch.zeros(2, 2)}, {})


def test_saved_kohya_file_loads_back_and_carries_metadata_and_hashes(tmp_path):
    adapter = _random_adapter()
    path = tmp_path / "my_lora.safetensors"
    save_kohya(adapter, path, base_model_version="sd_v2_v", tag_frequencies={"5_sks": {"sks person": 3}})
    back = load_adapter(path)  # adapter.py dispatches a kohya file here
    for n, m in adapter.modules.items():
        assert torch.equal(back.modules[n].delta_weight(), m.delta_weight()), n
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4.0"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "4"}  # one alpha per file
    assert meta["ss_base_model_version"] == "sd_v2_v" and meta["ss_output_name"] == "my_lora"
    assert json.loads(meta["ss_tag_frequency"]) == {"5_sks": {"sks person": 3}}
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert meta["modelspec.prediction_type"] == "v" and meta["modelspec.resolution"] == "768x768"
    # sd-webui-additional-networks' model hash: SHA-256 of the bytes after the header (independent of metadata).
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(blob[8 + n:]).hexdigest()
    assert len(meta["sshs_legacy_hash"]) == 8
