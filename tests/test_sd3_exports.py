"""SD3 / SD3.5 exports (issue 27 item 6): the diffusers layout that StableDiffusion3Pipeline.load_lora_weights loads
exactly, moving the transformer and both CLIP encoders."""

import pytest
import torch

from conftest import deep_update
from sdlora.model.loading import load_components
from sdlora.model.text import tokenize
from sdlora.training.loop import train

T5_LEN = 8


def quiet(*_a, **_k):
    pass


@pytest.fixture(scope="module")
def trained_sd35m(tiny_sd35m, shapes_data, tmp_path_factory):
    """A tiny SD3.5 Medium trained 3 steps at a high rate (the adapters move well away from zero), text encoders
    included, rank 4 with alpha 2 (a scale other than 1 must reach the file)."""
    from sdlora.config import validate

    cfg = validate({"model": {"path": str(tiny_sd35m)}, "data": {"path": str(shapes_data), "resolution": 64},
                    "output": {"dir": str(tmp_path_factory.mktemp("sd35m_run") / "run")},
                    "train": {"max_steps": 3, "batch_size": 2, "seed": 0}, "optim": {"lr": 2e-2},
                    "lora": {"rank": 4, "alpha": 2}, "log": {"tracker": "none"},
                    "text_encoder": {"t5_max_length": T5_LEN}})
    return cfg, train(cfg, log=quiet)


def outputs(transformer, text_encoders: list, tokenizers: list, family):
    """The conditioning and the transformer's prediction on fixed inputs, through sdlora's family."""
    ids = [tokenize(t, ["a red circle", "blue square"], 75) for t in tokenizers]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        cond = family.encode(text_encoders, ids, 1)
        pred = family.predict(transformer, torch.randn(2, 16, 8, 8, generator=gen), torch.tensor([300.0, 800.0]), cond)
    return {"hidden": cond.hidden, "pooled": cond.pooled, "prediction": pred}


def close(a, b) -> bool:
    """Equal up to fp32 rounding: peft computes base(x) + B(A(x))·s as sdlora does, in another association order
    for some modules; 1e-5 of the quantity's scale."""
    return torch.allclose(a, b, rtol=0, atol=1e-5 * float(b.abs().max()))


def test_stable_diffusion_3_pipeline_load_lora_weights_loads_the_export_exactly(trained_sd35m, tiny_sd35m):
    from diffusers import StableDiffusion3Pipeline

    cfg, result = trained_sd35m
    comps = result.components
    family = comps.family
    ours = outputs(comps.denoiser, list(comps.text_encoders.values()), comps.tokenizers, family)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd35m)
    pipe.tokenizer_3.model_max_length = T5_LEN
    encoders, tokenizers = [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3], \
        [pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3]
    base = outputs(pipe.transformer, encoders, tokenizers, family)
    pipe.load_lora_weights(str(result.adapter_path))
    theirs = outputs(pipe.transformer, encoders, tokenizers, family)
    for key in ours:
        assert close(theirs[key], ours[key]), key
        assert not close(base[key], ours[key]), key  # the adapter moves the transformer and both CLIPs
    # each CLIP moves on its own (their tokens side by side in the conditioning's first 77 positions)
    w_l = comps.text_encoders["text_encoder"].config.hidden_size
    clip_l, clip_g = (slice(0, w_l), slice(w_l, None))
    for part in (clip_l, clip_g):
        assert not close(base["hidden"][:, :77, part], ours["hidden"][:, :77, part])


def test_the_merged_diffusers_folder_through_diffusers_equals_the_trained_model(trained_sd35m, tmp_path):
    """`sdlora export --format merged-diffusers` of the run, loaded by StableDiffusion3Pipeline.from_pretrained:
    the same outputs as sdlora's trained model (merging W0 + s·B·A in fp32 rounds once per weight: 1e-5 of scale)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from sdlora.commands.export import run_export

    cfg, result = trained_sd35m
    comps = result.components
    out = run_export(result.adapter_path, "merged-diffusers", tmp_path / "merged", base=cfg.model.path, report=quiet)
    pipe = StableDiffusion3Pipeline.from_pretrained(out)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 3.0
    pipe.tokenizer_3.model_max_length = T5_LEN
    theirs = outputs(pipe.transformer, [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3],
                     [pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3], comps.family)
    ours = outputs(comps.denoiser, list(comps.text_encoders.values()), comps.tokenizers, comps.family)
    for key in ours:
        assert close(theirs[key], ours[key]), key


@pytest.mark.parametrize("fmt", ["kohya"])
def test_formats_not_written_for_sd3_yet_are_refused_by_name(trained_sd35m, tmp_path, fmt):
    from sdlora.commands.export import run_export
    from sdlora.errors import UserError

    cfg, result = trained_sd35m
    with pytest.raises(UserError, match=rf"^export --format {fmt}: not written for SD3.5 Medium adapters yet"):
        run_export(result.adapter_path, fmt, tmp_path / "x", base=cfg.model.path, report=quiet)
    assert not (tmp_path / "x").exists()


def test_a_model_without_t5_exports_a_merged_folder_without_t5(tiny_sd3_no_t5, make_config, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from sdlora.commands.export import run_export

    cfg = make_config({"model": {"path": str(tiny_sd3_no_t5)}, "train": {"max_steps": 1},
                       "text_encoder": {"t5_max_length": T5_LEN}})
    result = train(cfg, log=quiet)
    out = run_export(result.adapter_path, "merged-diffusers", tmp_path / "merged", base=cfg.model.path, report=quiet)
    assert not (out / "text_encoder_3").exists()
    pipe = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None)
    assert pipe.text_encoder_3 is None and load_components(str(out)).family.name == "sd3"
