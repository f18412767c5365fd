"""Samples during SD3 training go through StableDiffusion3Pipeline from the live models: the PNG equals what the
pipeline itself draws with the exported adapter loaded (load_lora_weights), with and without T5."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import deep_update
from sdlora.training.loop import train

T5_LEN = 8


def quiet(*_a, **_k):
    pass


@pytest.mark.parametrize("fixture", ["tiny_sd3", "tiny_sd3_no_t5"])
def test_a_training_sample_equals_the_pipelines_image_with_the_adapter_loaded(request, make_config, fixture):
    from diffusers import StableDiffusion3Pipeline

    model = request.getfixturevalue(fixture)
    cfg = make_config(deep_update({"model": {"path": str(model)}, "text_encoder": {"t5_max_length": T5_LEN},
                                   "train": {"max_steps": 1}, "optim": {"lr": 2e-2},
                                   "sample": {"prompts": ["a red circle"], "every_steps": 1, "num_inference_steps": 3,
                                              "guidance_scale": 4.0, "seed": 3}}, {}))
    result = train(cfg, log=quiet)
    ours = np.asarray(Image.open(result.out_dir / "samples" / "step_000001" / "00.png").convert("RGB")).astype(int)

    absent = {"text_encoder_3": None, "tokenizer_3": None} if "no_t5" in fixture else {}  # docs/sd3-notes.md
    pipe = StableDiffusion3Pipeline.from_pretrained(model, **absent)
    pipe.load_lora_weights(str(result.adapter_path))
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", negative_prompt="", num_inference_steps=3, guidance_scale=4.0, height=64, width=64,
                 max_sequence_length=T5_LEN, generator=torch.Generator().manual_seed(3)).images[0]
    theirs = np.asarray(image.convert("RGB")).astype(int)
    # the same models and latents; peft's and sdlora's LoRA sums differ in the last float bits, which can move a
    # pixel across a rounding boundary of uint8: at most 1 level apart
    assert ours.shape == theirs.shape == (64, 64, 3) and np.abs(ours - theirs).max() <= 1
    assert ours.std() > 0


SLG = {"layers": [0], "scale": 3.0, "start": 0.0, "stop": 1.0}  # a window wide enough for 3 steps (the pipeline
# applies it at steps i with start*n < i < stop*n)


def test_skip_layer_guidance_samples_equal_the_pipelines_with_the_same_settings(tiny_sd3, make_config):
    from diffusers import StableDiffusion3Pipeline

    cfg = make_config({"model": {"path": str(tiny_sd3)}, "text_encoder": {"t5_max_length": T5_LEN},
                       "train": {"max_steps": 1}, "optim": {"lr": 2e-2},
                       "sample": {"prompts": ["a red circle"], "every_steps": 1, "num_inference_steps": 3,
                                  "guidance_scale": 4.0, "seed": 3, "skip_layer_guidance": SLG}})
    result = train(cfg, log=quiet)
    ours = np.asarray(Image.open(result.out_dir / "samples" / "step_000001" / "00.png").convert("RGB")).astype(int)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    pipe.load_lora_weights(str(result.adapter_path))
    pipe.set_progress_bar_config(disable=True)
    draw = lambda **slg: np.asarray(pipe(  # noqa: E731
        "a red circle", negative_prompt="", num_inference_steps=3, guidance_scale=4.0, height=64, width=64,
        max_sequence_length=T5_LEN, generator=torch.Generator().manual_seed(3), **slg).images[0].convert("RGB")).astype(int)
    with_slg = draw(skip_guidance_layers=SLG["layers"], skip_layer_guidance_scale=SLG["scale"],
                    skip_layer_guidance_start=SLG["start"], skip_layer_guidance_stop=SLG["stop"])
    # as above: at most one uint8 level from LoRA sums rounding differently; and the guidance does change the image
    assert np.abs(ours - with_slg).max() <= 1
    assert np.abs(ours - draw()).max() > 8


def test_skip_layer_guidance_is_refused_where_it_cannot_apply(tiny_sd3, tiny_model, make_config):
    from sdlora.errors import UserError

    sample = {"prompts": ["a red circle"], "every_steps": 1, "num_inference_steps": 3}
    with pytest.raises(UserError, match=r"^sample.skip_layer_guidance: .*StableDiffusion3Pipeline"):
        train(make_config({"model": {"path": str(tiny_model)}, "train": {"max_steps": 1},
                           "sample": {**sample, "skip_layer_guidance": {}}}), log=quiet)
    with pytest.raises(UserError, match=r"^sample.skip_layer_guidance.layers: \[0, 40\]; this transformer has joint"):
        train(make_config({"model": {"path": str(tiny_sd3)}, "train": {"max_steps": 1},
                           "sample": {**sample, "skip_layer_guidance": {"layers": [0, 40]}}}), log=quiet)
