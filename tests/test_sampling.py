"""Samples during training: at the configured steps, from the live model, train mode restored."""

import numpy as np
import pytest
import torch
from PIL import Image

from sdlora.training.sampling import generate, sample_due
from sdlora.training.loop import train

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def sampled_run(tiny_model, shapes_data, tmp_path_factory):
    from sdlora.config import validate

    cfg = validate({"model": {"path": str(tiny_model)}, "data": {"path": str(shapes_data), "resolution": 64},
                    "output": {"dir": str(tmp_path_factory.mktemp("s") / "run")},
                    "train": {"max_steps": 5, "batch_size": 2}, "optim": {"lr": 3e-3}, "lora": {"rank": 4, "alpha": 4},
                    "log": {"tracker": "none"},
                    "sample": {"prompts": PROMPTS, "every_steps": 2, "num_inference_steps": 3, "seed": 3}})
    return cfg, train(cfg, log=lambda *a: None)


def test_samples_appear_at_the_configured_steps_and_at_the_end(sampled_run):
    cfg, result = sampled_run
    folders = sorted(p.name for p in (result.out_dir / "samples").iterdir())
    assert folders == ["step_000002", "step_000004", "step_000005"]
    for name in folders:
        files = sorted(p.name for p in (result.out_dir / "samples" / name).iterdir())
        assert files == ["00.png", "01.png", "grid.png"]
        assert Image.open(result.out_dir / "samples" / name / "00.png").size == (64, 64)
        assert Image.open(result.out_dir / "samples" / name / "grid.png").size == (128, 64)
    assert [s for s in range(1, 8) if sample_due(s, 7, cfg.sample)] == [2, 4, 6, 7]


def test_samples_come_from_the_live_trained_model_and_train_mode_is_restored(sampled_run):
    cfg, result = sampled_run
    c = result.components
    assert c.unet.training  # sampling ran in eval mode and put the UNet back
    final = np.asarray(Image.open(result.out_dir / "samples" / "step_000005" / "00.png"), dtype=np.int16)
    c.unet.eval()
    c.text_encoder.eval()
    again = np.asarray(generate(cfg, c, c.unet, c.text_encoder, torch.device("cpu"))[0], dtype=np.int16)
    assert np.abs(final - again).max() <= 1  # same live weights, same seed: the same image (PNG rounding aside)
    for layer in result.layers.values():
        layer.enabled = False
    base = np.asarray(generate(cfg, c, c.unet, c.text_encoder, torch.device("cpu"))[0], dtype=np.int16)
    assert np.abs(final - base).max() > 5  # the adapters are in the samples
