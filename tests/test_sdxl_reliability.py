"""Reliability on SDXL, where it runs through family code: a SIGINT mid-run and a resume give the uninterrupted run
(both encoders' adapters, their optimiser groups, the data position), the validation loss with SDXL's conditioning
(both encoders, pooled embedding, micro-conditioning) identical across the kill, and config errors that only the
loaded SDXL model can check, one line and exit 2."""

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from sdlora.cli import main
from sdlora.training.loop import train
from sdlora.training.signals import TrainingInterrupted
from sdxl_fixtures import sdxl_config, tiny_sdxl  # noqa: F401 (fixtures)

from outputs import quiet, validation_losses

STEPS = 4


def test_an_sdxl_run_interrupted_and_resumed_equals_the_uninterrupted_run_validation_included(sdxl_config, tmp_path):
    def cfg_for(out):
        return sdxl_config(output={"dir": str(out)}, train={"max_steps": STEPS},
                           optim={"lr": 3e-3, "text_encoder_2_lr": 1e-3, "scheduler": "cosine", "warmup_steps": 1},
                           checkpoint={"every_steps": 2}, validation={"every_steps": 1, "num_images": 2, "timesteps": 2})

    full = train(cfg_for(tmp_path / "full"), log=quiet)

    def interrupt_at_3(step, loss):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    cfg = cfg_for(tmp_path / "run")
    with pytest.raises(TrainingInterrupted):
        train(cfg, fault_hook=interrupt_at_3, log=quiet)
    resumed = train(cfg, resume="latest", log=quiet)
    a, b = load_file(full.adapter_path), load_file(resumed.adapter_path)
    assert a.keys() == b.keys() and any(k.startswith("text_encoder_2.") for k in a), sorted(a)[-3:]
    # CPU fp32, the same operations in the same order: bit-identical (test_checkpoint.py's reasoning)
    assert all(torch.equal(a[k], b[k]) for k in a)
    expected = validation_losses(tmp_path / "full")
    assert [s for s, _ in expected] == [1, 2, 3, 4] and len({v for _, v in expected}) == STEPS
    assert validation_losses(tmp_path / "run") == expected

    # The last logged validation loss, by hand from the same fixed inputs with SDXL's conditioning written out: both
    # encoders side by side, the pooled embedding, and time_ids (64, 64, 0, 0, 64, 64) for the 64-pixel squares
    # centre-cropped at 64. The same fp32 operations as the loop's: 1e-6 relative of an O(1) loss.
    from sdlora.data.pipeline import build_training_data
    from sdlora.model.text import tokenize
    from sdlora.training.losses import diffusion_loss, diffusion_target
    from sdlora.training.validation import ValidationLoss

    c = full.components
    encoders = [m.eval() for m in c.text_encoders.values()]
    c.unet.eval()
    held_out = build_training_data(cfg, c, say=quiet).held_out
    images = ValidationLoss(cfg, c, held_out, c.family.objective(c.noise_scheduler, c.vae.config, cfg.loss)).images
    total = 0.0
    with torch.no_grad():
        for im in images:
            k = len(im.timesteps)
            emb = c.family.encode(encoders, [tokenize(t, [im.caption] * k) for t in c.tokenizers])
            time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]]).expand(k, -1)
            pred = c.unet(c.noise_scheduler.add_noise(im.latents, im.noise, im.timesteps), im.timesteps,
                          encoder_hidden_states=emb.hidden,
                          added_cond_kwargs={"text_embeds": emb.pooled, "time_ids": time_ids}).sample
            target = diffusion_target(c.noise_scheduler, im.latents, im.noise, im.timesteps)
            total += float(diffusion_loss(pred, target, im.timesteps, c.noise_scheduler, cfg.loss))
    assert abs(total / len(images) - expected[-1][1]) <= 1e-6 * abs(expected[-1][1])


def test_sdxl_clip_skip_beyond_the_encoders_layers_is_one_line_and_exit_2(sdxl_config, tmp_path, capsys):
    cfg = sdxl_config(text_encoder={"clip_skip": 4})  # the tiny SDXL's encoders have 3 layers each
    path = tmp_path / "c.yaml"  # JSON is YAML
    path.write_text(json.dumps(cfg.model_dump(mode="json", exclude_none=True)))
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "text_encoder.clip_skip: 4" in err and "1 to 3" in err and "\n" not in err, err
