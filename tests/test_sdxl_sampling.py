"""SDXL samples during training: through StableDiffusionXLPipeline, from the live model (both encoders, adapters on)."""

import numpy as np
import pytest
import torch
from PIL import Image

from outputs import load_sdxl_pipeline
from sdlora.training.loop import train
from sdlora.training.sampling import generate
from sdxl_fixtures import sdxl_config, tiny_sdxl  # noqa: F401 (fixtures)

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture
def sampled_run(sdxl_config):
    cfg = sdxl_config(train={"max_steps": 4}, optim={"lr": 3e-3, "text_encoder_lr": 3e-3},
                      sample={"prompts": PROMPTS, "every_steps": 2, "num_inference_steps": 3, "seed": 3})
    return cfg, train(cfg, log=lambda *a: None)


def test_sdxl_samples_come_from_the_live_model_and_match_the_pipeline_with_the_exported_adapter(sampled_run, tiny_sdxl):
    cfg, result = sampled_run
    folders = sorted(p.name for p in (result.out_dir / "samples").iterdir())
    assert folders == ["step_000002", "step_000004"]
    final = np.asarray(Image.open(result.out_dir / "samples" / "step_000004" / "00.png"), dtype=np.int16)
    assert final.shape == (64, 64, 3)
    c = result.components
    assert c.unet.training and c.text_encoder_2.training  # sampling ran in eval mode and put every model back
    # The same image from diffusers' own StableDiffusionXLPipeline with the exported adapter loaded, prompted as a
    # user would (its own encode_prompt, zeros for the empty negative prompt, the same DDIM schedule and seed):
    # the live model's conditioning and UNet equal the loaded adapter's to ~1e-6 (test_sdxl.py), so 3 DDIM steps
    # and the VAE decode land within one 8-bit level.
    pipe = load_sdxl_pipeline(tiny_sdxl)
    pipe.load_lora_weights(str(result.adapter_path))
    from sdlora.training.sampling import inference_scheduler

    pipe.scheduler = inference_scheduler(c.noise_scheduler)
    theirs = pipe(PROMPTS[0], num_inference_steps=3, guidance_scale=cfg.sample.guidance_scale, height=64, width=64,
                  generator=torch.Generator().manual_seed(3), output_type="np").images[0]
    theirs = np.round(theirs * 255).astype(np.int16)
    assert np.abs(final - theirs).max() <= 1, np.abs(final - theirs).max()
    # ... and the adapters are in the samples: the base model gives another image.
    for m in (c.unet, c.text_encoder, c.text_encoder_2):
        m.eval()
    for layer in result.layers.values():
        layer.enabled = False
    base = np.asarray(generate(cfg, c, c.unet, [c.text_encoder, c.text_encoder_2], torch.device("cpu"))[0], dtype=np.int16)
    assert np.abs(final - base).max() > 5
