"""text_encoder.offload: frozen, cached text encoders kept on the CPU instead of the training device
(training/offload.py). A CPU run has one device, so the tests check the placement decision against a named GPU
device (no GPU needed: only torch.device values are compared) and route the encoders to the meta device, a device
distinct from the CPU, to see that place_models sends them, and only them, to the device it is given."""

import pytest
import torch

from sdlora.config_effects import ModelFacts, check
from sdlora.errors import UserError
from sdlora.model.loading import load_components
from sdlora.training.offload import text_encoder_device
from sdlora.training.placement import place_models

GPU, CPU = torch.device("cuda", 0), torch.device("cpu")


@pytest.mark.parametrize("train, cached, offload, device, expected", [
    (False, True, "auto", GPU, CPU),  # frozen and cached on a GPU: offloaded
    (False, True, True, GPU, CPU),
    (False, True, False, GPU, GPU),  # switched off
    (True, True, "auto", GPU, GPU),  # a trained encoder runs every step
    (True, True, True, GPU, GPU),
    (False, False, "auto", GPU, GPU),  # uncached: the frozen encoder runs every step
    (False, False, True, GPU, GPU),
    (False, True, "auto", CPU, CPU),  # a CPU run: nothing to offload from
])
def test_the_text_encoders_are_offloaded_only_when_frozen_and_cached(make_config, train, cached, offload, device,
                                                                     expected):
    cfg = make_config(text_encoder={"train": train, "offload": offload}, data={"cache_text_encoder_outputs": cached})
    assert text_encoder_device(cfg, device) == expected
    facts = ModelFacts(("text_encoder",), single_file=False, pickle=False)
    warned = any(line.startswith("sdlora: warning: text_encoder.offload ") for line in check(cfg, facts))
    assert warned == (offload != "auto" and (train or not cached))  # a set key that has no effect is reported


def test_offload_is_auto_by_default_and_rejects_other_words(make_config):
    assert make_config().text_encoder.offload == "auto"
    with pytest.raises(UserError, match="text_encoder.offload"):
        make_config(text_encoder={"offload": "sometimes"})


def test_place_models_puts_the_text_encoders_on_their_own_device(tiny_model, make_config):
    cfg = make_config(text_encoder={"train": False}, data={"cache_text_encoder_outputs": True})
    comps = load_components(str(tiny_model))
    place_models(comps, {}, CPU, torch.float32, cfg, text_device=torch.device("meta"))  # meta: a device not the CPU
    for name, encoder in comps.text_encoders.items():
        assert {p.device.type for p in encoder.parameters()} == {"meta"}, name  # none on the training device
    for model in (comps.denoiser, comps.vae):
        assert {p.device.type for p in model.parameters()} == {"cpu"}
    comps = load_components(str(tiny_model))
    place_models(comps, {}, CPU, torch.float32, cfg)  # no text device: everything on the training device
    assert all(p.device == CPU for e in comps.text_encoders.values() for p in e.parameters())


def test_an_offloaded_encoders_conditioning_moves_whole_to_the_training_device():
    from sdlora.model.sd3 import SD3Conditioning
    from sdlora.model.sdxl import SDXLConditioning

    hidden = torch.randn(2, 77, 768 + 1280)
    sdxl = SDXLConditioning(hidden, torch.randn(2, 1280), tuple(hidden.split([768, 1280], dim=-1))).to("meta")
    assert {t.device.type for t in (sdxl.hidden, sdxl.pooled, *sdxl.per_encoder)} == {"meta"}
    assert [e.shape[-1] for e in sdxl.per_encoder] == [768, 1280]
    sd3 = SD3Conditioning(torch.randn(2, 85, 64), torch.randn(2, 96), (32, 64), (32, 64)).to("meta")
    assert sd3.hidden.device.type == sd3.pooled.device.type == "meta" and sd3.widths == (32, 64)


def test_preservation_takes_the_base_conditioning_from_the_runs_text_cache(make_config):
    """With frozen encoders the preservation prompts go through the run's cache (offloaded encoders then run once
    per prompt, not at every preservation step), and the term is the one encoding them directly gives."""
    from sdlora.training.preservation import Preservation
    from sdlora.training.text_cache import make_text_cache

    prompts = ["a dog on a sofa", "a red car"]
    cfg = make_config(text_encoder={"train": False},
                      reg={"preservation": {"weight": 1.0, "source": "prompts", "prompts": prompts}})
    comps = load_components(cfg.model.path)
    cache = make_text_cache(cfg, [comps.text_encoder], comps.family)
    gen = torch.Generator().manual_seed(1)
    noisy, t = torch.randn(2, comps.unet.config.in_channels, 8, 8, generator=gen), torch.tensor([20, 700])
    direct = Preservation(cfg, comps, prompts)(comps.unet, [comps.text_encoder], noisy, t, {"captions": ["x", "y"]}, 3)
    cached = Preservation(cfg, comps, prompts, text_cache=cache)
    for step in (3, 6):
        cached(comps.unet, [comps.text_encoder], noisy, t, {"captions": ["x", "y"]}, step)
    assert cache.misses == len(set(cached.prompts_for(3, 2)) | set(cached.prompts_for(6, 2))) and cache.hits > 0
    # no adapters, same weights: the cached rows are the directly encoded ones, to the bit (torch.equal in the
    # text-cache tests), so the step-3 term is recomputed identically
    assert torch.equal(cached(comps.unet, [comps.text_encoder], noisy, t, {"captions": ["x", "y"]}, 3), direct)


def test_a_frozen_cached_run_with_offload_on_measures_validation_and_preservation(make_config, tmp_path):
    """The whole path with text_encoder.offload: true (on a CPU run the offload device is the training device, so
    this checks the wiring: validation and preservation read the run's cache, the run completes and logs them)."""
    import json

    from sdlora.training.loop import train

    cfg = make_config({"output": {"dir": str(tmp_path / "run")}, "train": {"max_steps": 2},
                       "text_encoder": {"train": False, "offload": True},
                       "validation": {"every_steps": 2, "timesteps": 2, "num_images": 1},
                       "reg": {"preservation": {"weight": 1.0, "source": "prompts", "prompts": ["a red car"]}}})
    train(cfg, log=lambda *a, **k: None)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for key in ("validation/loss", "preservation/loss"):
        values = [r[key] for r in records if key in r]
        assert values and all(0 <= v < float("inf") for v in values), (key, records)
