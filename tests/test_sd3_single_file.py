"""Single-file SD3 / SD3.5 checkpoints (issue 27 items 6 and 7): read offline (variant from the keys, text encoders
inside the file or from model.text_encoders_path), trained, and the merged single file in Stability's layout that
`StableDiffusion3Pipeline.from_single_file` reads back equal to the merged diffusers folder; missing parts and
malformed files refused in one line."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdlora.cli import main as cli_main
from sdlora.errors import UserError
from sdlora.model.loading import load_components
from sdlora.model.single_file import save_single_file
from test_sd3_exports import T5_LEN, close, outputs, quiet

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def as_released(comps):
    """The tiny model with CLIP-L's projection set to identity, as in the released SD3 models (their files carry
    none; diffusers' reader and kohya's set identity)."""
    proj = comps.text_encoder.text_projection
    proj.weight = torch.nn.Parameter(torch.eye(proj.weight.shape[0], proj.weight.shape[1]), requires_grad=False)
    return comps


def write_file(folder, path, drop: tuple[str, ...] = ()):
    """The tiny folder's model as an SD3 single file (sdlora's writer), without the keys under `drop`."""
    comps = as_released(load_components(str(folder)))
    save_single_file(path, comps)
    if drop:
        sd = {k: v for k, v in load_file(path).items() if not k.startswith(drop)}
        save_file(sd, path)
    return path, comps


@pytest.fixture(scope="module")
def sd35m_file(tiny_sd35m, tmp_path_factory):
    """The tiny SD3.5 Medium with all three text encoders in the file (as sd3_medium_incl_clips_t5xxlfp8)."""
    return write_file(tiny_sd35m, tmp_path_factory.mktemp("sd35m_file") / "sd35m.safetensors")


@pytest.fixture(scope="module")
def sd3_bare_file(tiny_sd3, tmp_path_factory):
    """The tiny SD3 Medium without text encoders (as sd3_medium.safetensors: MMDiT and VAE)."""
    return write_file(tiny_sd3, tmp_path_factory.mktemp("sd3_file") / "sd3.safetensors", drop=("text_encoders.",))


def same_weights(a: dict, b: dict):
    assert set(a) == set(b)
    for name in a:
        sa, sb = a[name].state_dict(), b[name].state_dict()
        assert set(sa) == set(sb), name
        assert all(torch.equal(sa[k], sb[k].to(sa[k].dtype)) for k in sa), name


# ------------------------------------------------------------------------------------------ reading
def test_a_single_file_with_its_text_encoders_reads_as_the_model_it_was_written_from(sd35m_file, tiny_sd35m):
    """Bit for bit, every part (fp32 in and out), and equal to what diffusers' own pipeline reader makes of it."""
    from diffusers import StableDiffusion3Pipeline

    path, comps = sd35m_file
    read = load_components(str(path), config_dir=str(tiny_sd35m))
    assert read.family.name == "sd35m" and read.family.title == "SD3.5 Medium"
    same_weights(read.models, comps.models)
    pipe = StableDiffusion3Pipeline.from_single_file(str(path), config=str(tiny_sd35m), local_files_only=True)
    same_weights({name: getattr(pipe, name) for name in read.models}, read.models)


@pytest.mark.parametrize("variant", ["sd3", "sd35m", "sd35l"])
def test_each_variant_is_recognised_from_the_keys_at_the_released_sizes(variant):
    """The bundled configs at the released sizes (SD3 Medium 24 blocks, SD3.5 Medium 24 with attn2 in 0-12, SD3.5
    Large 38 with QK-norm), written in the original layout on the meta device: sdlora names the variant diffusers'
    own `infer_diffusers_model_type` names, and each bundled config parses."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from transformers import CLIPTextConfig, T5Config

    from sdlora.model import mmdit_keys as M
    from sdlora.model.single_file import BUNDLED_CONFIGS, detect_family

    folder = BUNDLED_CONFIGS / {"sd3": "sd3_medium", "sd35m": "sd3.5_medium", "sd35l": "sd3.5_large"}[variant]
    with torch.device("meta"):  # also the sin-cos position table (seconds on the CPU at 384 x 384)
        transformer = SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(folder / "transformer"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
    sd = M.to_original(transformer.state_dict(), dict(transformer.config), prefix=M.SINGLE_FILE_PREFIX)
    family = detect_family(sd, "released.safetensors")
    assert family.name == variant and family.bundled_configs() == folder
    assert infer_diffusers_model_type(sd) == {"sd3": "sd3", "sd35m": "sd35_medium", "sd35l": "sd35_large"}[variant]
    assert vae.config.latent_channels == 16 and transformer.config.in_channels == 16
    widths = [CLIPTextConfig.from_pretrained(folder / te).hidden_size for te in ("text_encoder", "text_encoder_2")]
    assert sum(widths) == transformer.config.pooled_projection_dim
    assert T5Config.from_pretrained(folder / "text_encoder_3").d_model == transformer.config.joint_attention_dim


def test_an_fp8_t5_in_the_file_reads_as_its_fp8_values(sd35m_file, tiny_sd35m, tmp_path):
    """Stability's sd3_medium_incl_clips_t5xxlfp8 stores T5 in float8_e4m3fn: read to fp32, exactly the fp8 values."""
    path, _ = sd35m_file
    sd = load_file(path)
    t5 = "text_encoders.t5xxl.transformer."
    sd = {k: v.to(torch.float8_e4m3fn) if k.startswith(t5) and v.is_floating_point() else v for k, v in sd.items()}
    save_file(sd, tmp_path / "fp8.safetensors")
    read = load_components(str(tmp_path / "fp8.safetensors"), config_dir=str(tiny_sd35m))
    got = read.models["text_encoder_3"].state_dict()
    assert all(torch.equal(got[k], sd[t5 + k].float()) for k in got)
    assert got["shared.weight"].dtype == torch.float32


def test_text_encoders_the_file_lacks_come_from_text_encoders_path(sd3_bare_file, tiny_sd3):
    path, comps = sd3_bare_file
    read = load_components(str(path), config_dir=str(tiny_sd3), text_encoders_path=str(tiny_sd3))
    donor = load_components(str(tiny_sd3))
    assert sorted(read.text_encoders) == ["text_encoder", "text_encoder_2", "text_encoder_3"]
    same_weights({n: read.models[n] for n in read.text_encoders}, {n: donor.models[n] for n in read.text_encoders})
    same_weights({n: read.models[n] for n in ("transformer", "vae")}, {n: comps.models[n] for n in ("transformer", "vae")})
    assert read.tokenizers_by_part["text_encoder_3"]("a red circle").input_ids == \
        donor.tokenizers_by_part["text_encoder_3"]("a red circle").input_ids


# ------------------------------------------------------------------------------------------ training and the round trip
@pytest.fixture(scope="module")
def trained_on_file(sd35m_file, tiny_sd35m, shapes_data, tmp_path_factory):
    """A tiny SD3.5 Medium single file trained 3 steps with the text encoders (model.path the file)."""
    from sdlora.config import validate
    from sdlora.training.loop import train

    path, _ = sd35m_file
    cfg = validate({"model": {"path": str(path), "config_dir": str(tiny_sd35m)},
                    "data": {"path": str(shapes_data), "resolution": 64},
                    "output": {"dir": str(tmp_path_factory.mktemp("file_run") / "run")},
                    "train": {"max_steps": 3, "batch_size": 2, "seed": 0}, "optim": {"lr": 2e-2},
                    "lora": {"rank": 4, "alpha": 2}, "log": {"tracker": "none"},
                    "text_encoder": {"t5_max_length": T5_LEN}})
    return cfg, train(cfg, log=quiet)


def test_a_single_file_without_text_encoders_trains_with_text_encoders_path(sd3_bare_file, tiny_sd3, make_config,
                                                                             tmp_path, capsys):
    """Trains; `sdlora export --format merged-single-file --text-encoders` then writes a complete file (the encoders
    the base file lacked included), and without --text-encoders it is the one-line refusal."""
    from sdlora.training.loop import train

    path, _ = sd3_bare_file
    cfg = make_config({"model": {"path": str(path), "config_dir": str(tiny_sd3), "text_encoders_path": str(tiny_sd3)},
                       "train": {"max_steps": 2}, "text_encoder": {"t5_max_length": T5_LEN}})
    result = train(cfg, log=quiet)
    assert result.components.family.name == "sd3" and result.adapter_path.is_file()
    assert all(torch.isfinite(torch.tensor(result.losses)))
    export = ["export", str(result.adapter_path), "--format", "merged-single-file", "--base", str(path),
              "--config-dir", str(tiny_sd3)]
    assert cli_main(export + ["--out", str(tmp_path / "m.safetensors"), "--text-encoders", str(tiny_sd3)]) == 0
    keys = load_file(tmp_path / "m.safetensors").keys()
    assert all(any(k.startswith(f"text_encoders.{e}.transformer.") for k in keys) for e in ("clip_l", "clip_g", "t5xxl"))
    capsys.readouterr()
    assert cli_main(export + ["--out", str(tmp_path / "n.safetensors")]) == 2
    assert "holds no CLIP-L" in capsys.readouterr().err and not (tmp_path / "n.safetensors").exists()


def test_the_merged_single_file_read_by_diffusers_equals_the_merged_folder(trained_on_file, tiny_sd35m, tmp_path):
    """export --format merged-single-file and merged-diffusers of a run trained on a single file: the file read back
    by StableDiffusion3Pipeline.from_single_file (configs from the tiny folder, offline) gives the folder's outputs
    bit for bit (both written from the same merged fp32 weights), and both give sdlora's trained model's within 1e-5
    of scale (merging W0 + s·B·A rounds once per weight)."""
    from diffusers import StableDiffusion3Pipeline
    from safetensors import safe_open

    from sdlora.commands.export import run_export

    cfg, result = trained_on_file
    comps = result.components
    common = dict(base=cfg.model.path, config_dir=str(tiny_sd35m), report=quiet)
    single = run_export(result.adapter_path, "merged-single-file", tmp_path / "merged.safetensors", **common)
    folder = run_export(result.adapter_path, "merged-diffusers", tmp_path / "merged", **common)
    with safe_open(str(single), framework="pt") as f:
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-3-5-medium"
    from_file = StableDiffusion3Pipeline.from_single_file(str(single), config=str(tiny_sd35m), local_files_only=True)
    from_folder = StableDiffusion3Pipeline.from_pretrained(folder)
    got = []
    for pipe in (from_file, from_folder):
        pipe.tokenizer_3.model_max_length = T5_LEN
        got.append(outputs(pipe.transformer, [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3],
                           [pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3], comps.family))
    ours = outputs(comps.denoiser, list(comps.text_encoders.values()), comps.tokenizers, comps.family)
    for key in ours:
        assert torch.equal(got[0][key], got[1][key]), key
        assert close(got[0][key], ours[key]), key
    base = load_components(cfg.model.path, config_dir=str(tiny_sd35m))
    base.tokenizers_by_part["text_encoder_3"].model_max_length = T5_LEN
    base_out = outputs(base.denoiser, list(base.text_encoders.values()), base.tokenizers, comps.family)
    assert not any(close(base_out[k], ours[k]) for k in ours)  # the merge moved the transformer and the encoders
    same_weights(load_components(str(single), config_dir=str(tiny_sd35m)).models,
                 {name: getattr(from_file, name) for name in comps.models})


# ------------------------------------------------------------------------------------------ refusals
def write_train_config(tmp_path, shapes_data, model: dict) -> str:
    cfg = {"model": model, "data": {"path": str(shapes_data), "resolution": 64},
           "output": {"dir": str(tmp_path / "out")}, "train": {"max_steps": 1}, "log": {"tracker": "none"}}
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))
    return str(tmp_path / "c.yaml")


def refusal(capsys, config: str) -> str:
    capsys.readouterr()
    assert cli_main(["train", "--config", config]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_a_file_without_text_encoders_and_no_text_encoders_path_is_refused_in_one_line(sd3_bare_file, tiny_sd3,
                                                                                       shapes_data, tmp_path, capsys):
    path, _ = sd3_bare_file
    err = refusal(capsys, write_train_config(tmp_path, shapes_data, {"path": str(path), "config_dir": str(tiny_sd3)}))
    assert str(path) in err and "holds no CLIP-L (text_encoders.clip_l.transformer.*)" in err
    assert "set model.text_encoders_path to a diffusers SD3 / SD3.5 folder" in err
    assert not (tmp_path / "out").exists()


def test_text_encoders_path_must_hold_what_is_missing(sd3_bare_file, tiny_sd3, shapes_data, tmp_path, capsys):
    path, _ = sd3_bare_file
    donor = tmp_path / "clip_l_only"
    for sub in ("text_encoder", "tokenizer"):
        shutil.copytree(tiny_sd3 / sub, donor / sub)
    err = refusal(capsys, write_train_config(tmp_path, shapes_data, {
        "path": str(path), "config_dir": str(tiny_sd3), "text_encoders_path": str(donor)}))
    assert f"holds no CLIP-G (text_encoders.clip_g.transformer.*); {donor} has no text_encoder_2/ either" in err


def test_a_t5_in_the_file_without_a_t5_tokenizer_anywhere_is_refused(sd35m_file, tiny_sd35m, shapes_data, tmp_path,
                                                                      capsys):
    """No T5 tokenizer is bundled: configs without tokenizer_3 and no model.text_encoders_path name both ways."""
    path, _ = sd35m_file
    configs = tmp_path / "configs"
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
                "scheduler"):
        shutil.copytree(tiny_sd35m / sub, configs / sub, ignore=shutil.ignore_patterns("*.safetensors"))
    err = refusal(capsys, write_train_config(tmp_path, shapes_data, {"path": str(path), "config_dir": str(configs)}))
    assert "holds T5-XXL, and sdlora bundles no T5 tokenizer; set model.text_encoders_path (or model.config_dir)" in err


def test_text_encoders_path_with_a_folder_model_is_refused(tiny_sd3, shapes_data, tmp_path, capsys):
    err = refusal(capsys, write_train_config(tmp_path, shapes_data, {"path": str(tiny_sd3),
                                                                     "text_encoders_path": str(tiny_sd3)}))
    assert err.startswith("error: model.text_encoders_path: for an SD3 / SD3.5 single-file model.path only")


def _drop_block_qkv(sd):
    return {k: v for k, v in sd.items() if k != "model.diffusion_model.joint_blocks.1.x_block.attn.qkv.weight"}


def _narrow_embedder(sd):
    key = "model.diffusion_model.context_embedder.weight"
    return {**sd, key: sd[key][:, :8].contiguous()}


MALFORMED = {
    "a joint block's qkv missing": (_drop_block_qkv, "diffusers could not read it as SD3.5 Medium"),
    "a weight of another shape": (_narrow_embedder, "diffusers could not read it as SD3.5 Medium"),
    "no VAE": (lambda sd: {k: v for k, v in sd.items() if not k.startswith("first_stage_model.")},
               "is an SD3.5 Medium file without its VAE (no first_stage_model.* keys)"),
    "a transformer-only file": (lambda sd: {k.removeprefix("model.diffusion_model."): v for k, v in sd.items()
                                            if k.startswith("model.diffusion_model.")},
                                "is a transformer-only SD3 / SD3.5 file"),
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_a_malformed_sd3_file_is_refused_in_one_line(kind, sd35m_file, tiny_sd35m, shapes_data, tmp_path, capsys):
    path, _ = sd35m_file
    change, message = MALFORMED[kind]
    bad = tmp_path / "bad.safetensors"
    save_file(change(load_file(path)), bad)
    err = refusal(capsys, write_train_config(tmp_path, shapes_data, {"path": str(bad), "config_dir": str(tiny_sd35m)}))
    assert str(bad) in err and message in err, err
    with pytest.raises(UserError):
        load_components(str(bad), config_dir=str(tiny_sd35m))


def test_a_clip_l_projection_in_the_file_is_read(tiny_sd35m, tmp_path):
    """A file that carries CLIP-L's text_projection (sdlora's and kohya's writers do) gets it back: diffusers' reader
    would set identity, which only the released models have."""
    comps = load_components(str(tiny_sd35m))  # the tiny model's projection is random, not identity
    save_single_file(tmp_path / "f.safetensors", comps)
    read = load_components(str(tmp_path / "f.safetensors"), config_dir=str(tiny_sd35m))
    assert torch.equal(read.text_encoder.text_projection.weight, comps.text_encoder.text_projection.weight)
    assert not torch.equal(comps.text_encoder.text_projection.weight, torch.eye(32))


def test_an_sd3_checkpoint_in_a_pickle_file_is_refused_even_with_allow_pickle(sd35m_file, tiny_sd35m, shapes_data,
                                                                              tmp_path, capsys):
    path, _ = sd35m_file
    sd = {k: v for k, v in load_file(path).items() if k.startswith(("model.diffusion_model.", "first_stage_model."))}
    torch.save({"state_dict": sd}, tmp_path / "sd3.ckpt")
    err = refusal(capsys, write_train_config(tmp_path, shapes_data, {
        "path": str(tmp_path / "sd3.ckpt"), "config_dir": str(tiny_sd35m), "allow_pickle": True}))
    assert "is an SD3 / SD3.5 checkpoint in a pickle file; sdlora reads SD3 files as .safetensors only" in err


def test_a_merged_file_carries_only_the_base_files_unmapped_tensors(sd35m_file, tmp_path):
    """`single_file_carry`: nothing of an SD3 file (every tensor is written from the loaded models), and from any file
    exactly its unmapped tensors, the same whether read from .safetensors (only those tensors) or a pickle."""
    from sdlora.adapter.merge import single_file_carry

    path, _ = sd35m_file
    assert single_file_carry(str(path), allow_pickle=False) == {}
    extra = {"alphas_cumprod": torch.rand(4), "cond_stage_model.model.transformer.resblocks.23.ln_1.weight": torch.rand(3)}
    sd = {"model.diffusion_model.x": torch.zeros(2), "text_encoders.clip_l.transformer.y": torch.zeros(2),
          "first_stage_model.z": torch.zeros(2), "v_pred": torch.tensor([]), **extra}
    save_file(sd, tmp_path / "b.safetensors")
    torch.save({"state_dict": sd}, tmp_path / "b.ckpt")
    for name in ("b.safetensors", "b.ckpt"):
        got = single_file_carry(str(tmp_path / name), allow_pickle=True)
        assert set(got) == set(extra) and all(torch.equal(got[k], extra[k]) for k in extra), name
