"""Samples with their own settings (sample.entries, sample.prompts_file in kohya's format): each is drawn with its own
seed, size and steps, and its PNG carries AUTOMATIC1111's `parameters` text."""

import numpy as np
import pytest
import torch
from PIL import Image

from sdlora.errors import UserError
from sdlora.training.png_info import parameters_text
from sdlora.training.sample_prompts import SamplePrompt, parse_prompt_line, parse_prompt_lines, sample_prompts
from sdlora.training.sampling import generate

PROMPT_FILE = """# kohya's format: options after ' --'
a red circle --n blurry, dark --w 96 --h 64 --d 7 --l 5.5 --s 3

a blue square --d 7 --s 2
"""


def test_kohya_prompt_lines_are_read_with_every_option():
    lines = parse_prompt_lines(PROMPT_FILE.splitlines(), "p.txt")
    assert [line.as_config() for line in lines] == [
        {"prompt": "a red circle", "negative_prompt": "blurry, dark", "width": 96, "height": 64, "seed": 7,
         "guidance_scale": 5.5, "num_inference_steps": 3},
        {"prompt": "a blue square", "seed": 7, "num_inference_steps": 2}]


@pytest.mark.parametrize("line, message", [
    ("a cat --ss euler_a", "p.txt line 1: option --ss euler_a is not one sdlora reads (allowed: --n, --w, --h"),
    ("a cat --w 100", "width 100 must be at least 64 and a multiple of 8"),
    ("a cat --d seven", "--d 'seven' is not a int"),
    (" --n blurry", "the prompt is blank"),
])
def test_a_bad_prompt_line_is_one_error_naming_file_and_line(line, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_prompt_line(line, "p.txt line 1")


def test_a1111_parameters_text_has_the_fields_its_reader_parses():
    text = parameters_text(SamplePrompt("a red circle", "blurry, dark", 96, 64, 7, 5.5, 3), model="/m/tiny-sd/",
                           lora_name="mylora", clip_skip=2)
    prompt, negative, fields = text.split("\n")
    assert prompt == "a red circle <lora:mylora:1>" and negative == "Negative prompt: blurry, dark"
    assert fields == "Steps: 3, Sampler: DDIM, CFG scale: 5.5, Seed: 7, Size: 96x64, Model: tiny-sd, Clip skip: 2, RNG: CPU"
    plain = parameters_text(SamplePrompt("a, b", "", 64, 64, 0, 7.0, 20), model="m", lora_name="x", clip_skip=1)
    assert "Negative prompt" not in plain and plain.startswith("a, b <lora:x:1>\nSteps: 20")


@pytest.fixture(scope="module")
def sampled(tiny_model, shapes_data, tmp_path_factory):
    from sdlora.config import validate
    from sdlora.training.loop import train

    folder = tmp_path_factory.mktemp("sp")
    (folder / "prompts.txt").write_text(PROMPT_FILE)
    cfg = validate({"model": {"path": str(tiny_model)}, "data": {"path": str(shapes_data), "resolution": 64},
                    "output": {"dir": str(folder / "run"), "name": "shapes"},
                    "train": {"max_steps": 2, "batch_size": 2}, "optim": {"lr": 3e-3},
                    "lora": {"rank": 4, "alpha": 4}, "log": {"tracker": "none"}, "text_encoder": {"clip_skip": 2},
                    "sample": {"every_steps": 2, "num_inference_steps": 4, "seed": 1, "prompts": ["a green circle"],
                               "entries": [{"prompt": "a red circle", "seed": 7, "num_inference_steps": 3}],
                               "prompts_file": str(folder / "prompts.txt")}})
    return cfg, train(cfg, log=lambda *a: None)


def test_a_training_sample_carries_its_parameters(sampled):
    cfg, result = sampled
    folder = result.out_dir / "samples" / "step_000002"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["00.png", "01.png", "02.png", "03.png", "grid.png"]
    texts = [Image.open(folder / f"{i:02d}.png").text["parameters"] for i in range(4)]
    assert texts[0].startswith("a green circle <lora:shapes:1>\nSteps: 4, Sampler: DDIM, CFG scale: 7.0, Seed: 1, "
                               "Size: 64x64")
    assert "Clip skip: 2" in texts[0]
    assert texts[1].splitlines()[1].startswith("Steps: 3,") and "Seed: 7," in texts[1]
    assert texts[2].splitlines()[1] == "Negative prompt: blurry, dark"
    assert "Steps: 3, Sampler: DDIM, CFG scale: 5.5, Seed: 7, Size: 96x64" in texts[2]
    assert Image.open(folder / "02.png").size == (96, 64) and Image.open(folder / "00.png").size == (64, 64)
    assert Image.open(folder / "grid.png").size == (2 * 96, 2 * 64)  # cells of the largest sample


def test_per_prompt_seed_and_steps_are_honoured(sampled):
    """Drawn again alone from the same live model with the settings its PNG names, a sample is the same image; with
    one setting changed it is not."""
    cfg, result = sampled
    c = result.components
    c.unet.eval()
    c.text_encoder.eval()
    saved = np.asarray(Image.open(result.out_dir / "samples" / "step_000002" / "01.png"), dtype=np.int16)
    red = sample_prompts(cfg)[1]
    assert (red.prompt, red.seed, red.steps, red.width) == ("a red circle", 7, 3, 64)

    def draw(p):
        return np.asarray(generate(cfg, c, c.unet, c.text_encoder, torch.device("cpu"), prompts=[p])[0], dtype=np.int16)

    assert np.abs(draw(red) - saved).max() <= 1  # PNG stores what PIL was given; 1 for rounding
    assert np.abs(draw(SamplePrompt(**{**red.__dict__, "seed": 8})) - saved).max() > 5
    assert np.abs(draw(SamplePrompt(**{**red.__dict__, "steps": 4})) - saved).max() > 5
