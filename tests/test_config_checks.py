"""Settings that validate but cannot train, and errors that came too late or as tracebacks (issue 14, item 6).

Each is one line on stderr and exit code 2: at validation when the config alone tells, before the model loads
when a path or an installed package tells, right after it loads when only the model can tell, and always
before the first step, so --dry-run stops where the real run would.
"""

import importlib.util
import subprocess
import sys

import pytest
import torch

from conftest import deep_update
from sdlora.config import load_config, validate
from sdlora.errors import UserError
from sdlora.lora import inject_all
from sdlora.model.loading import load_components
from sdlora.model.tiny import write_tiny_tokenizer

BASE = {"model": {"path": "m"}, "data": {"path": "d"}, "output": {"dir": "o"}}


def cfg_of(extra: dict):
    import copy

    return validate(deep_update(copy.deepcopy(BASE), extra))


def run_cli(tmp_path, body: str, *args):
    """`sdlora train` on a YAML body; returns (exit code, stderr lines)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(body)
    proc = subprocess.run([sys.executable, "-m", "sdlora.cli", "train", "--config", str(cfg), *args],
                          capture_output=True, text=True, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, proc.stderr.strip().splitlines()


def yaml_for(tiny_model, shapes_data, tmp_path, extra: str = "") -> str:
    return (f"model:\n  path: {tiny_model}\ndata:\n  path: {shapes_data}\n  resolution: 64\n"
            f"output:\n  dir: {tmp_path / 'run'}\nlog:\n  tracker: none\n{extra}")


# ------------------------------------------------------------------------------------------- lora.alpha
@pytest.mark.parametrize("lora", [{"alpha": 0}, {"alpha": 0.0, "learnable_alpha": True}, {"conv": True, "conv_alpha": 0}])
def test_zero_alpha_is_rejected_naming_the_key(lora):
    key = "lora.conv_alpha" if "conv_alpha" in lora else "lora.alpha"
    with pytest.raises(UserError, match=rf"^config error: {key}: 0 makes the adapter's scale alpha/r zero"):
        cfg_of({"lora": lora})
    assert cfg_of({"lora": {"alpha": -4}}).lora.alpha == -4  # a negative alpha trains (B absorbs the sign)


# ------------------------------------------------------------------------------------- rank limits per init
# The tiny UNet's attention Linears are 32 wide, its text encoder 48 wide, its convs 32 x 3 x 3 = 288.
@pytest.mark.parametrize("init, rank, limit, shape", [
    ("orthogonal", 66, 65, "input width 32"),
    ("principal", 33, 32, "weight 32 x 32"),
])
def test_a_rank_beyond_the_init_limit_stops_dry_run_with_one_line(tiny_model, shapes_data, tmp_path, init, rank, limit, shape):
    code, lines = run_cli(tmp_path, yaml_for(tiny_model, shapes_data, tmp_path, f"lora:\n  rank: {rank}\n  init: {init}\n"),
                          "--dry-run")
    assert code == 2 and len(lines) == 1, lines
    assert f"lora.rank: {rank} is too large for lora.init={init} at unet." in lines[0], lines
    assert f"({shape}); the largest rank it allows there is {limit}" in lines[0], lines


def test_orthogonal_conv_rank_limit_names_lora_conv_rank(make_config, tiny_model):
    # conv_in is 4 x 3 x 3 = 36 inputs wide: orthogonal allows up to rank 73 there.
    cfg = make_config(lora={"init": "orthogonal", "conv": True, "conv_rank": 80, "conv_targets": ["re:^conv_in$"]})
    comps = load_components(str(tiny_model))
    with pytest.raises(UserError, match=r"lora.conv_rank: 80 is too large for lora.init=orthogonal at unet.conv_in "
                                        r"\(input width 36\); the largest rank it allows there is 73"):
        inject_all(comps.adaptable(), cfg, comps.family)


@pytest.mark.parametrize("init, rank", [("orthogonal", 65), ("principal", 32)])
def test_the_largest_allowed_rank_builds_and_leaves_the_output_unchanged(make_config, tiny_model, init, rank):
    cfg = make_config(lora={"init": init, "rank": rank, "unet_targets": ["to_q"]}, text_encoder={"train": False})
    comps = load_components(str(tiny_model))
    layers = inject_all(comps.adaptable(), cfg, comps.family)
    for layer in layers.values():
        x = torch.randn(3, layer.base.in_features)
        layer.enabled = False
        base = layer(x)
        layer.enabled = True
        # fp32 layer, |W x| ~ 1: the init's step-0 change is float rounding, far below 1e-4.
        assert (layer(x) - base).abs().max() < 1e-4


# ------------------------------------------------------------------------------------------------- SDXL
def make_tiny_sdxl(out):
    """A tiny SDXL diffusers folder made with diffusers' own classes (two text encoders, a text_time UNet)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    write_tiny_tokenizer(out.parent / "xl_tokenizer")
    tok = CLIPTokenizer.from_pretrained(out.parent / "xl_tokenizer")
    te = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=77, projection_dim=32, bos_token_id=tok.bos_token_id,
              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2)
    StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**te)),
                              text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**te)), tokenizer=tok,
                              tokenizer_2=tok, unet=unet, scheduler=DDIMScheduler()).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return make_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "model")


def test_an_sdxl_unet_is_recognised_by_its_config_alone(tiny_sdxl, tmp_path):
    # A folder whose model_index.json was rewritten to look like SD 1.x: the UNet's text_time embedding tells.
    import json
    import shutil

    copy = tmp_path / "renamed"
    shutil.copytree(tiny_sdxl, copy)
    index = json.loads((copy / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionPipeline"
    index.pop("text_encoder_2"), index.pop("tokenizer_2")
    (copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="is an SDXL model"):
        load_components(str(copy))


def test_an_sdxl_single_file_without_both_text_encoders_is_refused_naming_them(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.ones(4),
               "model.diffusion_model.input_blocks.0.0.weight": torch.ones(4)}, str(path))
    with pytest.raises(UserError, match=r"is an SDXL checkpoint without both of its text encoders \(CLIP-L under "
                                        r"conditioner.embedders.0.transformer.\*"):
        load_components(str(path))


def test_an_inpainting_unet_is_refused_at_load(tiny_model, tmp_path):
    import json
    import shutil

    copy = tmp_path / "inpaint"
    shutil.copytree(tiny_model, copy)
    from diffusers import UNet2DConditionModel

    cfg = json.loads((copy / "unet" / "config.json").read_text())
    cfg["in_channels"] = 9
    UNet2DConditionModel.from_config(cfg).save_pretrained(copy / "unet")
    with pytest.raises(UserError, match="its UNet takes 9 input channels, the VAE gives 4"):
        load_components(str(copy))


# ------------------------------------------------------------------------------------ config file parsing
@pytest.mark.parametrize("name, body, where, cause", [
    ("tab.yaml", "model:\n  path: m\ndata:\n\tpath: d\n", "line 4, column 1", "found character '\\t' that cannot start any token"),
    ("quote.yaml", "model:\n  path: \"m\noutput:\n  dir: o\n", "line 5, column 1", "found unexpected end of stream"),
    ("twice.yaml", "model:\n  path: m\n  path: n\n", "line 3, column 3", "key 'path' appears twice in one section"),
    ("bad.toml", "[model]\npath = m\n", "line 2, column 8", "Invalid value"),
])
def test_a_config_that_does_not_parse_names_file_line_column_and_cause(tmp_path, name, body, where, cause):
    path = tmp_path / name
    path.write_text(body)
    with pytest.raises(UserError) as e:
        load_config(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and where in msg and cause in msg, msg


# ------------------------------------------------------------------------------- paths that fail to load
def test_a_vae_folder_that_does_not_load_is_one_line_naming_it(tiny_model, shapes_data, tmp_path):
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text("{\"_class_name\": \"AutoencoderKL\"}")
    (vae / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    body = yaml_for(tiny_model, shapes_data, tmp_path).replace(f"  path: {tiny_model}\n",
                                                               f"  path: {tiny_model}\n  vae_path: {vae}\n", 1)
    code, lines = run_cli(tmp_path, body, "--dry-run")
    assert code == 2 and len(lines) == 1 and f"model.vae_path: {vae} could not be loaded as a VAE" in lines[0], lines


# -------------------------------------------------------------------------------------------- prodigy
def test_prodigy_gets_its_own_default_rate_and_refuses_an_adam_rate():
    assert cfg_of({"optim": {"optimizer": "prodigy"}}).optim.lr == 1.0
    assert cfg_of({"optim": {"optimizer": "adamw"}}).optim.lr == 1e-4
    assert cfg_of({"optim": {"optimizer": "prodigy", "lr": 0.5}}).optim.lr == 0.5
    with pytest.raises(UserError, match=r"optim.lr: 0.0001 with optim.optimizer=prodigy: .*use about 1.0"):
        cfg_of({"optim": {"optimizer": "prodigy", "lr": 1e-4}})
    with pytest.raises(UserError, match=r"optim.text_encoder_lr: 5e-05 with optim.optimizer=prodigy"):
        cfg_of({"optim": {"optimizer": "prodigy", "text_encoder_lr": 5e-5}})


def test_prodigy_receives_eps(make_config):
    pytest.importorskip("prodigyopt")
    from sdlora.training.optim import make_optimizer

    opt = make_optimizer([{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1.0}],
                         make_config(optim={"optimizer": "prodigy", "lr": 1.0, "eps": 1e-6}))
    assert opt.defaults["eps"] == 1e-6


# Prodigy keeps one step size d for all groups and steps each at d·lr with one lr: prodigyopt 1.1 raises at the
# first step when groups' rates differ (other than 0), 1.0 silently used the first group's (kohya-ss/sd-scripts#1929).
@pytest.mark.parametrize("optim, key", [
    ({"b_lr_ratio": 4.0}, "optim.b_lr_ratio"),
    ({"lr_rules": [{"match": "unet.up", "lr_scale": 0.5}]}, "optim.lr_rules.0"),
    ({"text_encoder_lr": 0.5}, "optim.text_encoder_lr"),
    ({"alpha_lr": 2.0}, "optim.alpha_lr"),
])
def test_prodigy_refuses_different_rates_per_group_naming_the_key(make_config, tiny_model, optim, key):
    from sdlora.lora import build_param_groups
    from sdlora.training.optim import check_rates

    lora = {"learnable_alpha": True} if "alpha_lr" in optim else {}
    cfg = make_config(optim={"optimizer": "prodigy", "lr": 1.0, **optim}, lora=lora)
    comps = load_components(str(tiny_model))
    groups = build_param_groups(inject_all(comps.adaptable(), cfg, comps.family), cfg, comps.family)
    with pytest.raises(UserError, match=rf"^{key}: .*optim.optimizer=prodigy steps every parameter group at one rate"):
        check_rates(groups.groups, cfg)
    adamw = make_config(optim={**optim, "optimizer": "adamw", "lr": 1.0}, lora=lora)
    check_rates(groups.groups, adamw)  # AdamW takes a rate per group


def test_prodigy_with_lora_plus_stops_before_training_and_trains_with_one_rate_and_a_frozen_group(make_config, tmp_path):
    pytest.importorskip("prodigyopt")
    from sdlora.training.loop import train

    cfg = make_config(optim={"optimizer": "prodigy", "lr": 1.0, "b_lr_ratio": 16.0}, train={"max_steps": 2})
    with pytest.raises(UserError, match=r"^optim.b_lr_ratio: 16"):
        train(cfg, log=lambda *a: None)
    assert not (tmp_path / "run" / "config.yaml").exists()  # before the run folder was written
    # One rate, and 0 for the text encoder (Prodigy's documented way to freeze a group): it trains.
    cfg = make_config(optim={"optimizer": "prodigy", "lr": 1.0, "text_encoder_lr": 0.0}, train={"max_steps": 2},
                      output={"dir": str(tmp_path / "ok")})
    result = train(cfg, log=lambda *a: None)
    ups = {name: layer.lora_B for name, layer in result.layers.items()}
    assert all(bool(w.abs().sum() == 0) for n, w in ups.items() if n.startswith("text_encoder")), "frozen at 0"
    assert any(bool(w.abs().sum() > 0) for n, w in ups.items() if n.startswith("unet")), "the UNet trained"


def test_a_missing_optional_optimiser_is_named_before_the_model_loads(shapes_data, tmp_path):
    if importlib.util.find_spec("prodigyopt") is not None:
        pytest.skip("prodigyopt is installed")
    # The model path does not exist: the optimiser's message comes first, so no model was loaded for nothing.
    code, lines = run_cli(tmp_path, yaml_for(tmp_path / "no-model", shapes_data, tmp_path,
                                             "optim:\n  optimizer: prodigy\n"), "--dry-run")
    assert code == 2 and len(lines) == 1, lines
    assert "optim.optimizer: prodigy needs prodigyopt" in lines[0] and "pip install 'sdlora[prodigy]'" in lines[0]


def test_a_missing_wandb_is_named_before_the_model_loads(shapes_data, tmp_path):
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    code, lines = run_cli(tmp_path, yaml_for(tmp_path / "no-model", shapes_data, tmp_path, "").replace(
        "tracker: none", "tracker: wandb"))
    assert code == 2 and len(lines) == 1, lines  # the model path does not exist: nothing was loaded first
    assert "log.tracker: wandb needs wandb" in lines[0] and "pip install 'sdlora[wandb]'" in lines[0]
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------ the schema sweep: config alone
@pytest.mark.parametrize("extra, message", [
    ({"optim": {"warmup_steps": 200}, "train": {"max_steps": 100}}, "optim.warmup_steps (200) must be <= train.max_steps (100)"),
    ({"optim": {"betas": [0.9, 1.0]}}, "optim.betas: 1.0 is out of range"),
    ({"data": {"subsets": [{"path": "e"}]}}, "data.path and data.subsets are both set"),
    ({"data": {"resolution": 64, "bucket_step": 128}}, "no bucket fits"),
    ({"data": {"caption_extension": ".png"}}, "caption_extension '.png' is an image or metadata extension"),
    ({"sample": {"prompts": ["a cat", " "]}}, "sample.prompts.1 is blank"),
    ({"reg": {"probe_prompts": []}}, "reg.probe_prompts is an empty list"),
    ({"lora": {"unet_targets": []}, "text_encoder": {"train": False}}, "nothing to train"),
])
def test_settings_that_cannot_train_fail_at_validation(extra, message):
    with pytest.raises(UserError) as e:
        cfg_of(extra)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


# ------------------------------------------------------------ the schema sweep: only the model can tell
@pytest.mark.parametrize("extra, message", [
    ("loss:\n  max_timestep: 1500\n", "loss.max_timestep: 1500 is beyond the model's 1000 training timesteps"),
    ("loss:\n  min_timestep: 1000\n", "loss.min_timestep: 1000 must be < the model's 1000 training timesteps"),
    ("text_encoder:\n  clip_skip: 4\n", "text_encoder.clip_skip: 4 is more than the text encoder's 3 layers"),
])
def test_settings_only_the_model_can_judge_stop_dry_run(tiny_model, shapes_data, tmp_path, extra, message):
    code, lines = run_cli(tmp_path, yaml_for(tiny_model, shapes_data, tmp_path, extra), "--dry-run")
    assert code == 2 and len(lines) == 1 and message in lines[0], lines


def test_a_missing_data_folder_is_named_before_the_model_loads(shapes_data, tmp_path):
    code, lines = run_cli(tmp_path, yaml_for(tmp_path / "no-model", tmp_path / "no-data", tmp_path), "--dry-run")
    assert code == 2 and lines == [f"error: data.path: no such folder: {tmp_path / 'no-data'}"], lines
