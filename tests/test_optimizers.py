"""The optional optimisers (optim.optimizer adafactor, lion, came, adamw_schedulefree): each trains, resumes
bit-identically after an interrupt, and is refused in one line when its package is missing. Lion, CAME and
schedule-free AdamW need the `optimizers` extra (pytorch-optimizer); their tests skip without it."""

import importlib.util
import os
import signal
import sys

import pytest
import torch
from safetensors.torch import load_file

from sdlora.config import validate
from sdlora.errors import UserError
from sdlora.training.loop import train
from sdlora.training.signals import TrainingInterrupted

N = 4
HAS_PACKAGE = importlib.util.find_spec("pytorch_optimizer") is not None
needs_package = pytest.mark.skipif(not HAS_PACKAGE, reason="pytorch-optimizer (the optimizers extra) not installed")


def _cfg(tiny_model, shapes_data, out, optimizer, **optim):
    return validate({"model": {"path": str(tiny_model)}, "data": {"path": str(shapes_data), "resolution": 64},
                     "output": {"dir": str(out)}, "train": {"max_steps": N, "batch_size": 2, "seed": 0},
                     "optim": {"optimizer": optimizer, "lr": 1e-3, "max_grad_norm": 1.0, "weight_decay": 0.01, **optim},
                     "lora": {"rank": 4, "alpha": 4}, "log": {"tracker": "none"},
                     "checkpoint": {"every_steps": 2, "keep_last": 2}})


def _interrupt_at(stop_step):
    def hook(step, loss):
        if step == stop_step:
            os.kill(os.getpid(), signal.SIGINT)
        return loss
    return hook


@pytest.mark.parametrize("optimizer, optim", [
    ("adafactor", {}),
    pytest.param("lion", {"lr": 1e-4}, marks=needs_package),
    pytest.param("came", {}, marks=needs_package),
    pytest.param("adamw_schedulefree", {"warmup_steps": 2}, marks=needs_package),
])
def test_trains_and_resumes_bit_identically(tiny_model, shapes_data, tmp_path, optimizer, optim):
    full = train(_cfg(tiny_model, shapes_data, tmp_path / "full", optimizer, **optim), log=lambda *a: None)
    cfg = _cfg(tiny_model, shapes_data, tmp_path / "cut", optimizer, **optim)
    with pytest.raises(TrainingInterrupted):
        train(cfg, fault_hook=_interrupt_at(3), log=lambda *a: None)
    train(cfg, resume="latest", log=lambda *a: None)
    a, b = load_file(full.adapter_path), load_file(tmp_path / "cut" / "adapter.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # CPU fp32, the same operations in the same order
    ups = [v for k, v in a.items() if "lora_B" in k or "lora_up" in k]
    assert ups and max(float(v.abs().max()) for v in ups) > 0  # it trained: B left its zero start


@needs_package
def test_schedule_free_checkpoints_and_exports_its_average(tiny_model, shapes_data, tmp_path):
    """Between steps the weights are schedule-free AdamW's average (eval mode): the checkpoint says so."""
    result = train(_cfg(tiny_model, shapes_data, tmp_path / "run", "adamw_schedulefree"), log=lambda *a: None)
    state = torch.load(result.out_dir / "checkpoints" / "step_000004" / "optimizer.pt", weights_only=True)
    assert state["param_groups"] and all(g["train_mode"] is False for g in state["param_groups"])


@pytest.mark.parametrize("optimizer", ["lion", "came", "adamw_schedulefree"])
def test_a_missing_package_is_one_line_naming_the_extra(tiny_model, shapes_data, tmp_path, monkeypatch, optimizer):
    monkeypatch.setitem(sys.modules, "pytorch_optimizer", None)  # import fails as when it is not installed
    with pytest.raises(UserError, match=rf"optim.optimizer: {optimizer} needs pytorch-optimizer "
                                        r"\(pip install 'sdlora\[optimizers\]'\)"):
        train(_cfg(tiny_model, shapes_data, tmp_path / "run", optimizer), log=lambda *a: None)


def test_schedule_free_refuses_a_schedule(tiny_model, shapes_data, tmp_path):
    with pytest.raises(UserError, match="schedule-free AdamW replaces the schedule"):
        _cfg(tiny_model, shapes_data, tmp_path, "adamw_schedulefree", scheduler="cosine")
