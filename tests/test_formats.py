"""Single-file checkpoints: the LDM key mapping on the real SD 1.5 / 2.x architectures, architecture and
prediction-type detection, offline loading of tiny single files, the pickle guard and VAE swapping."""

import json

import pytest
import torch
from accelerate import init_empty_weights

from outputs import max_abs_diff, model_outputs
from sdlora.errors import UserError
from sdlora.model import ldm_keys as L
from sdlora.model.single_file import BUNDLED_CONFIGS, detect_version, load_tokenizer, read_checkpoint, save_single_file
from sdlora.model.loading import load_components
from sdlora.model.tiny import make_tiny_model

TOL = 1e-5


def _real_models(version):
    """The real architecture's three models on the meta device (no memory), from the bundled configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = BUNDLED_CONFIGS / version
    read = lambda part: json.loads((root / part / "config.json").read_text())  # noqa: E731
    te_cfg = {k: v for k, v in read("text_encoder").items() if k not in ("architectures", "model_type")}
    with init_empty_weights():
        return (UNet2DConditionModel.from_config(read("unet")), AutoencoderKL.from_config(read("vae")),
                CLIPTextModel(CLIPTextConfig(**te_cfg)))


@pytest.mark.parametrize("version", ["sd_v1", "sd_v2_v"])
def test_ldm_mapping_covers_every_parameter_of_the_real_architecture_both_ways(version):
    import diffusers.loaders.single_file_utils as oracle

    unet, vae, te = _real_models(version)
    ldm = dict(L.unet_to_ldm(unet.state_dict(), dict(unet.config)))
    ldm.update(L.vae_to_ldm(vae.state_dict(), dict(vae.config)))
    te_sd = te.state_dict()
    if version == "sd_v1":
        ldm.update(L.clip_l_to_ldm(te_sd))
        te_back = L.clip_l_from_ldm(ldm, te_sd.keys())
        assert sum(k.startswith(L.CLIP_L) for k in ldm) == 197  # CLIP-L: 196 weights + position_ids
    else:
        ldm.update(L.open_clip_to_ldm(te_sd, 23))
        te_back = L.open_clip_from_ldm(ldm, te_sd.keys(), 23)
        assert sum(k.startswith(L.OPEN_CLIP) for k in ldm) == 23 * 12 + 4  # fused qkv: 12 tensors per block
    # The released checkpoints hold 686 UNet and 248 VAE tensors.
    assert sum(k.startswith(L.UNET) for k in ldm) == 686 and sum(k.startswith(L.VAE) for k in ldm) == 248
    unet_back = L.unet_from_ldm(ldm, dict(unet.config), unet.state_dict().keys())
    vae_back = L.vae_from_ldm(ldm, dict(vae.config), vae.state_dict().keys())
    for original, back in ((unet.state_dict(), unet_back), (vae.state_dict(), vae_back), (te_sd, te_back)):
        assert set(back) == set(original)
        assert all(back[k].shape == original[k].shape for k in original)
    # diffusers' own LDM converters, an independent reading of the layout, agree on every key and shape.
    ref_unet = oracle.convert_ldm_unet_checkpoint(dict(ldm), unet.config)
    ref_vae = oracle.convert_ldm_vae_checkpoint(dict(ldm), vae.config)
    assert {k: v.shape for k, v in ref_unet.items()} == {k: v.shape for k, v in unet.state_dict().items()}
    assert {k: v.shape for k, v in ref_vae.items()} == {k: v.shape for k, v in vae.state_dict().items()}
    if version != "sd_v1":
        ref_te = oracle.convert_open_clip_checkpoint(te, dict(ldm))
        assert {k.removeprefix("text_model."): v.shape for k, v in ref_te.items()} == {k: v.shape for k, v in te_sd.items()}


@pytest.mark.parametrize("version, meta, expect", [
    ("sd_v1", {}, "sd_v1"),
    ("sd_v2", {}, "sd_v2"),
    ("sd_v2", {"modelspec.prediction_type": "v"}, "sd_v2_v"),
])
def test_detection_reads_the_architecture_from_keys_and_the_prediction_type_from_metadata(version, meta, expect):
    unet, vae, te = _real_models(version)
    ldm = L.unet_to_ldm(unet.state_dict(), dict(unet.config))
    ldm.update(L.clip_l_to_ldm(te.state_dict()) if version == "sd_v1" else L.open_clip_to_ldm(te.state_dict(), 23))
    ldm = {k: torch.zeros(v.shape[:1] or (1,)) if k.endswith("norm1.bias") else v for k, v in ldm.items()}
    assert detect_version(ldm, meta) == expect


def test_sd2_v_models_are_told_apart_by_comfyuis_norm_bias_rule_when_the_file_says_nothing():
    unet, _, te = _real_models("sd_v2")
    ldm = L.unet_to_ldm(unet.state_dict(), dict(unet.config))
    ldm.update(L.open_clip_to_ldm(te.state_dict(), 23))
    key = L.UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
    ldm[key] = torch.randn(640, generator=torch.Generator().manual_seed(0)) * 0.2
    assert detect_version(ldm, {}) == "sd_v2_v"
    ldm[key] = torch.randn(640, generator=torch.Generator().manual_seed(0)) * 0.02
    assert detect_version(ldm, {}) == "sd_v2"


def test_bundled_tokenizer_is_clip_with_49408_tokens_and_known_ids():
    tok = load_tokenizer(BUNDLED_CONFIGS / "sd_v1")
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert load_tokenizer(BUNDLED_CONFIGS / "sd_v2").pad_token == "!"  # SD 2.x pads with id 0


@pytest.fixture(scope="module", params=["sd1", "sd2", "sd2-v"])
def tiny_single_file(request, tmp_path_factory):
    folder = make_tiny_model(tmp_path_factory.mktemp(request.param) / "model", variant=request.param)
    comps = load_components(str(folder))
    path = folder.parent / "model.safetensors"
    save_single_file(path, comps)
    return request.param, folder, path, comps


def test_tiny_single_file_loads_offline_like_its_diffusers_folder(tiny_single_file):
    variant, folder, path, comps = tiny_single_file
    expected = {"sd1": "sd_v1", "sd2": "sd_v2", "sd2-v": "sd_v2_v"}[variant]
    sd, meta = read_checkpoint(path, allow_pickle=False)
    assert detect_version(sd, meta) == expected
    loaded = load_components(str(path), config_dir=str(folder))
    assert loaded.base_model_version == expected
    assert loaded.prediction_type == ("v_prediction" if variant == "sd2-v" else "epsilon")
    ours = model_outputs(comps.unet, comps.text_encoder, comps.tokenizer)
    diff = max_abs_diff(ours, model_outputs(loaded.unet, loaded.text_encoder, loaded.tokenizer))
    assert diff["unet"] <= TOL and diff["text_encoder"] <= TOL, diff
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert float((comps.vae.encode(x).latent_dist.mean - loaded.vae.encode(x).latent_dist.mean).abs().max()) <= TOL


def test_diffusers_reads_our_single_files_identically(tiny_single_file):
    from diffusers import StableDiffusionPipeline

    variant, folder, path, comps = tiny_single_file
    if variant == "sd2-v":
        pytest.skip("same key layout as sd2")
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)
    diff = max_abs_diff(model_outputs(comps.unet, comps.text_encoder, comps.tokenizer),
                        model_outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer))
    assert diff["unet"] <= TOL and diff["text_encoder"] <= TOL, diff


def test_a_tiny_file_without_config_dir_fails_naming_config_dir(tiny_single_file):
    _, _, path, _ = tiny_single_file
    with pytest.raises(UserError, match="model.config_dir"):
        load_components(str(path))


def test_pickle_checkpoints_need_allow_pickle(tiny_single_file, tmp_path):
    _, folder, path, comps = tiny_single_file
    sd, _ = read_checkpoint(path, allow_pickle=False)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "global_step": 1}, ckpt)
    with pytest.raises(UserError, match=r"pickle.*arbitrary code.*safetensors.*allow_pickle"):
        load_components(str(ckpt), config_dir=str(folder))
    loaded = load_components(str(ckpt), config_dir=str(folder), allow_pickle=True)
    diff = max_abs_diff(model_outputs(comps.unet, comps.text_encoder, comps.tokenizer),
                        model_outputs(loaded.unet, loaded.text_encoder, loaded.tokenizer))
    assert diff["unet"] <= TOL, diff


def test_vae_path_swaps_in_a_bare_ldm_vae_file(tiny_single_file, tmp_path):
    from sdlora.util.atomic import save_safetensors

    variant, folder, path, _ = tiny_single_file
    other = load_components(str(make_tiny_model(tmp_path / "other", seed=5, variant=variant)))
    bare = {k: v for k, v in L.vae_to_ldm(other.vae.state_dict(), dict(other.vae.config)).items()}
    vae_file = tmp_path / "vae.safetensors"
    save_safetensors(vae_file, {k.removeprefix(L.VAE): v for k, v in bare.items()})
    swapped = load_components(str(path), config_dir=str(folder), vae_path=str(vae_file))
    for k, v in other.vae.state_dict().items():
        assert torch.equal(swapped.vae.state_dict()[k], v), k


def test_non_sd_files_are_user_errors(tmp_path):
    from sdlora.util.atomic import save_safetensors

    lora = tmp_path / "lora.safetensors"
    save_safetensors(lora, {"lora_unet_x.lora_down.weight": torch.zeros(2, 2)})
    with pytest.raises(UserError, match="not an SD 1.x, 2.x or SDXL checkpoint"):
        load_components(str(lora))
    (tmp_path / "model.gguf").write_bytes(b"x")
    with pytest.raises(UserError, match="allowed single files"):
        load_components(str(tmp_path / "model.gguf"))
