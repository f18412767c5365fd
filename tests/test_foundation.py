"""The spine: train on the tiny model, export, and load the adapter in diffusers exactly."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from outputs import load_pipeline, max_abs_diff, model_outputs, pipeline_outputs
from sdlora.training.loop import train

TOL = 1e-5  # fp32


def trained_outputs(result):
    c = result.components
    c.unet.eval()
    c.text_encoder.eval()
    return model_outputs(c.unet, c.text_encoder, c.tokenizer)


def test_exported_adapter_loads_in_diffusers_and_reproduces_the_trained_model(make_config, tiny_model):
    cfg = make_config(lora={"rank": 4, "alpha": 2})  # alpha != rank: the scale must be folded into B
    result = train(cfg)
    ours = trained_outputs(result)

    pipe = load_pipeline(tiny_model)
    base = pipeline_outputs(pipe)
    pipe.load_lora_weights(str(result.adapter_path))
    loaded = pipeline_outputs(pipe)

    diff = max_abs_diff(ours, loaded)
    assert diff["unet"] <= TOL and diff["text_encoder"] <= TOL, diff
    moved = max_abs_diff(ours, base)
    assert moved["unet"] > 1e-3 and moved["text_encoder"] > 1e-3, moved


def test_adapter_metadata_records_the_run(make_config):
    result = train(make_config())
    with safe_open(str(result.adapter_path), "pt") as f:
        meta = f.metadata()
    assert meta["sdlora.rank"] == "4" and meta["sdlora.steps"] == "10"
    assert json.loads(meta["sdlora.config"])["lora"]["rank"] == 4
    assert meta["sdlora.version"]
    assert (result.out_dir / "config.yaml").is_file()


def test_frozen_weights_stay_frozen(make_config, tiny_model):
    result = train(make_config())
    pipe = load_pipeline(tiny_model)
    base_sd = pipe.unet.state_dict()
    for name, layer in result.layers.items():
        if name.startswith("unet."):
            path = name.removeprefix("unet.")
            assert torch.equal(layer.base.weight, base_sd[f"{path}.weight"]), name


def test_training_loss_falls_over_50_steps(make_config):
    cfg = make_config(train={"max_steps": 50, "batch_size": 4}, optim={"lr": 2e-3, "text_encoder_lr": 1e-3})
    losses = train(cfg).losses
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.95 * first, (first, last)


@pytest.mark.parametrize(
    "body, key",
    [
        ("lora:\n  rnak: 4\n", "lora.rnak"),
        ("train:\n  max_steps: many\n", "train.max_steps"),
    ],
)
def test_bad_config_exits_2_with_one_line_naming_the_key(tmp_path, tiny_model, shapes_data, body, key):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  path: {tiny_model}\ndata:\n  path: {shapes_data}\noutput:\n  dir: {tmp_path / 'o'}\n{body}")
    proc = subprocess.run([sys.executable, "-m", "sdlora.cli", "train", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()  # nothing written before validation
