"""`sdlora train` on the tiny SD3 / SD3.5 models end to end (issue 27 items 2-4): every variant trains and exports,
T5 frozen, step-0 output unchanged for every adapter kind and init, text-encoder outputs cached when frozen,
validation loss, EMA, output preservation and the non-finite guard. Seconds each, on the session fixtures."""

import json
import math

import pytest
import torch
from safetensors import safe_open

from conftest import deep_update
from sdlora.lora import adapters_disabled
from sdlora.model.loading import load_components
from sdlora.model.text import tokenize
from sdlora.training.loop import train
from sdlora.training.setup import build_model

T5_LEN = 8


@pytest.fixture
def sd3_config(make_config):
    def build(model, extra=None):
        return make_config(deep_update({"model": {"path": str(model)}, "text_encoder": {"t5_max_length": T5_LEN},
                                        "train": {"max_steps": 2}}, extra or {}))
    return build


def quiet(*_a, **_k):
    pass


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("fixture", ["tiny_sd3", "tiny_sd3_no_t5", "tiny_sd35m", "tiny_sd35l"])
def test_every_sd3_variant_trains_and_exports_with_t5_frozen(request, sd3_config, fixture):
    model = request.getfixturevalue(fixture)
    result = train(sd3_config(model), log=quiet)
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)
    with safe_open(str(result.adapter_path), "pt") as f:
        parts = {k.split(".")[0] for k in f.keys()}
        meta = f.metadata()
    assert parts == {"transformer", "text_encoder", "text_encoder_2"}  # T5 frozen by default: no text_encoder_3
    with safe_open(str(result.out_dir / "adapter_kohya.safetensors"), "pt") as f:  # the run's file for ComfyUI
        assert {k.split("_")[0] + "_" + k.split("_")[1] for k in f.keys()} == {"lora_unet", "lora_te1", "lora_te2"}
        assert any(k.startswith("lora_unet_joint_blocks_0_x_block_attn_qkv.") for k in f.keys())
    assert meta["sdlora.base_model_version"] == result.components.base_model_version
    if "no_t5" not in fixture:  # T5's weights are those of the folder
        fresh = load_components(str(model)).text_encoders["text_encoder_3"].state_dict()
        trained = result.components.text_encoders["text_encoder_3"].state_dict()
        assert all(torch.equal(fresh[k], trained[k]) for k in fresh)


def _outputs(comps, family, cfg):
    """The transformer's prediction, the conditioning and the pooled vector on fixed inputs."""
    family = family.for_run(comps, cfg)  # T5's tokenizer at text_encoder.t5_max_length
    gen = torch.Generator().manual_seed(0)
    ids = [tokenize(t, ["a red circle", ""], 75) for t in comps.tokenizers]
    with torch.no_grad():
        cond = family.encode(list(comps.text_encoders.values()), ids, 1)
        noisy = torch.randn(2, 16, 8, 8, generator=gen)
        pred = family.predict(comps.denoiser, noisy, torch.tensor([250.0, 750.0]), cond)
    return pred, cond.hidden, cond.pooled


@pytest.mark.parametrize("kind,init", [("lora", "zero"), ("lora", "orthogonal"), ("lora", "compensated"),
                                       ("lora", "principal"), ("dora", "zero"), ("loha", "zero"), ("lokr", "zero")])
def test_step0_output_is_unchanged_for_every_kind_and_init(tiny_sd35m, sd3_config, kind, init):
    """Adapters at their init give the untouched model's outputs. Zero-B inits add exact zeros; the offset inits
    (compensated, principal) subtract their start update from the base weight in fp32, so they equal it up to
    rounding: 1e-5 of the output's scale (fp32 sums of ~100 products carry ~1e-6 relative error)."""
    cfg = sd3_config(tiny_sd35m, {"lora": {"type": kind, "init": init, "learnable_alpha": kind == "lora"}})
    comps, layers, _ = build_model(cfg, quiet)
    family = comps.family
    base = load_components(str(tiny_sd35m))
    expected = _outputs(base, family, cfg)
    got = _outputs(comps, family, cfg)
    assert layers and any(n.startswith("text_encoder_2.") for n in layers)
    for e, g in zip(expected, got):
        assert torch.allclose(g, e, rtol=0, atol=1e-5 * float(e.abs().max())), (kind, init)


def test_frozen_text_encoders_outputs_are_cached_and_train_as_uncached(tiny_sd3, sd3_config, tmp_path):
    """text_encoder.train false: each caption encoded once (the cache hits), losses equal to a run without it."""
    from sdlora.training.setup import prepare_run
    from accelerate import Accelerator

    cfg = sd3_config(tiny_sd3, {"text_encoder": {"train": False}, "train": {"max_steps": 3}})
    comps, layers, groups = build_model(cfg, quiet)
    run = prepare_run(cfg, Accelerator(cpu=True), tmp_path / "x", True, quiet, comps, layers, groups)
    assert run.text_cache is not None
    cached = train(cfg, log=quiet)
    plain = train(sd3_config(tiny_sd3, {"text_encoder": {"train": False}, "train": {"max_steps": 3},
                                        "data": {"cache_text_encoder_outputs": False},
                                        "output": {"dir": str(tmp_path / "plain")}}), log=quiet)
    assert cached.losses == plain.losses and not any(n.startswith("text_encoder") for n in cached.layers)


def test_validation_loss_ema_and_preservation_on_sd3(tiny_sd3, sd3_config):
    cfg = sd3_config(tiny_sd3, {"validation": {"every_steps": 2, "num_images": 1, "timesteps": 2},
                                "train": {"ema": {"enabled": True, "decay": 0.5}},
                                "reg": {"preservation": {"weight": 0.5}}})
    result = train(cfg, log=quiet)
    rows = metrics(result.out_dir)
    validation = [r["validation/loss"] for r in rows if "validation/loss" in r]
    preservation = [r["preservation/loss"] for r in rows if "preservation/loss" in r]
    assert len(validation) == 1 and math.isfinite(validation[0]) and validation[0] > 0
    assert preservation and all(math.isfinite(p) and p >= 0 for p in preservation)
    with safe_open(str(result.out_dir / "adapter_ema.safetensors"), "pt") as ema, \
            safe_open(str(result.adapter_path), "pt") as live:
        assert set(ema.keys()) == set(live.keys())
        assert any(not torch.equal(ema.get_tensor(k), live.get_tensor(k)) for k in live.keys() if "lora_B" in k)


def test_a_non_finite_sd3_step_is_skipped(tiny_sd3, sd3_config):
    cfg = sd3_config(tiny_sd3, {"train": {"max_steps": 3}})
    seen = {}

    def poison(step, loss):
        return loss * float("nan") if step == 2 else loss

    result = train(cfg, log=lambda *a, **k: seen.setdefault("lines", []).append(" ".join(map(str, a))),
                   fault_hook=poison)
    assert result.step == 3 and metrics(result.out_dir)[-1]["nonfinite_steps"] == 1
    assert any("step 2" in line and "skipped" in line for line in seen["lines"])
    with safe_open(str(result.adapter_path), "pt") as f:
        assert all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys())


def test_the_base_prediction_with_adapters_disabled_is_the_folders(tiny_sd3, sd3_config):
    """Preservation and the Fisher estimate read the base model through adapters_disabled on the live model."""
    cfg = sd3_config(tiny_sd3, {"lora": {"init": "principal"}})
    comps, layers, _ = build_model(cfg, quiet)
    for layer in layers.values():  # move the adapters away from their init
        for p in layer.parameters():
            if p.requires_grad:
                p.data.add_(0.1)
    with adapters_disabled(comps.denoiser, *comps.text_encoders.values()):
        got = _outputs(comps, comps.family, cfg)
    expected = _outputs(load_components(str(tiny_sd3)), comps.family, cfg)
    for e, g in zip(expected, got):
        assert torch.allclose(g, e, rtol=0, atol=1e-5 * float(e.abs().max()))


def test_the_embedding_norm_penalty_and_the_probe_hold_each_text_output_the_transformer_reads(tiny_sd3, sd3_config):
    """Each CLIP's tokens, T5's tokens and each CLIP's half of the pooled vector: a penalty term and a probe line
    each (T5 frozen: its drift is exactly 0)."""
    cfg = sd3_config(tiny_sd3, {"reg": {"embedding_norm": {"weight": 0.01}, "probe_every": 1},
                                "optim": {"lr": 2e-2}})
    result = train(cfg, log=quiet)
    row = metrics(result.out_dir)[-1]
    probe = [json.loads(line) for line in (result.out_dir / "probe.jsonl").read_text().splitlines()][-1]
    for output in ("text_encoder_2", "text_encoder_3", "pooled_l", "pooled"):
        assert any(k.startswith(f"embedding_norm/{output}/") for k in row), output
        assert f"probe/{output}/drift" in probe, output
    assert any(k.startswith("embedding_norm/") and k.count("/") == 1 for k in row)  # text_encoder's own (first) name
    assert probe["probe/text_encoder_3/drift"] == 0.0
    assert probe["probe/drift"] > 0 and probe["probe/text_encoder_2/drift"] > 0 and probe["probe/pooled/drift"] > 0
