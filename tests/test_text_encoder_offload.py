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
