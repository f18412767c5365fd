"""validation: a held-out loss with fixed latents, noise and timesteps, comparable across a kill-and-resume."""

import json
import os
import signal

import pytest

from sdlora.errors import UserError
from sdlora.training.loop import train
from sdlora.training.signals import TrainingInterrupted

from outputs import quiet, validation_losses

STEPS = 4


def val_cfg(make_config, out, **validation):
    return make_config({"output": {"dir": str(out)}, "train": {"max_steps": STEPS},
                        "checkpoint": {"every_steps": 2}, "validation": {"every_steps": 1, "timesteps": 2, **validation}})


def test_validation_loss_is_identical_across_a_kill_and_resume(make_config, tmp_path):
    full = tmp_path / "full"
    train(val_cfg(make_config, full, num_images=2), log=quiet)
    out = tmp_path / "run"
    cfg = val_cfg(make_config, out, num_images=2)

    def interrupt_at_3(step, loss):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    with pytest.raises(TrainingInterrupted):
        train(cfg, fault_hook=interrupt_at_3, log=quiet)
    train(cfg, resume="latest", log=quiet)
    expected = validation_losses(full)
    assert [s for s, _ in expected] == [1, 2, 3, 4]
    assert validation_losses(out) == expected  # exact floats: the same weights and the same fixed inputs
    assert len({v for _, v in expected}) == STEPS  # it moves with the weights


def test_a_validation_folder_leaves_training_unchanged(make_config, shapes_data, tmp_path):
    plain = train(make_config(output={"dir": str(tmp_path / "plain")}, train={"max_steps": 3}), log=quiet)
    out = tmp_path / "val"
    with_val = train(make_config(output={"dir": str(out)}, train={"max_steps": 3},
                                 validation={"every_steps": 2, "path": str(shapes_data), "timesteps": 1,
                                             "with_probe": True}), log=quiet)
    assert with_val.losses == plain.losses  # no global RNG drawn, no training image taken
    assert [s for s, _ in validation_losses(out)] == [2, 3]
    probe_steps = [json.loads(line)["step"] for line in (out / "probe.jsonl").read_text().splitlines()]
    assert probe_steps == [2, 3]


def test_held_out_images_do_not_train(make_config, tiny_model):
    from sdlora.data.pipeline import build_training_data
    from sdlora.model.loading import load_components

    cfg = make_config(validation={"every_steps": 1, "num_images": 3})
    data = build_training_data(cfg, load_components(str(tiny_model)), say=quiet)
    train_paths = {s.item.path for s in data.samples}
    held = {s.item.path for s in data.held_out}
    assert len(held) == 3 and len(train_paths) == 5 and not train_paths & held


def test_validation_config_errors(make_config, tmp_path):
    with pytest.raises(UserError, match="exactly one of validation.path"):
        make_config(validation={"every_steps": 5})
    with pytest.raises(UserError, match="leaves no training images"):
        train(make_config(validation={"every_steps": 1, "num_images": 8}), log=quiet)
    with pytest.raises(UserError, match="validation.path: no such folder"):
        train(make_config(validation={"every_steps": 1, "path": str(tmp_path / "nope")}), log=quiet)
