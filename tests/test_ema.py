"""train.ema: an exponential moving average of the adapter weights, exported beside the raw adapter and carried
through checkpoints exactly."""

import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from sdlora.commands.export import run_export
from sdlora.errors import UserError
from sdlora.training.loop import train
from sdlora.training.signals import TrainingInterrupted

DECAY, START, STEPS = 0.6, 2, 4


def quiet(*a, **k):
    pass


def ema_cfg(make_config, out, **extra):
    return make_config({"output": {"dir": str(out)}, "train": {"max_steps": STEPS, "ema": {
        "enabled": True, "decay": DECAY, "start_step": START}}, "checkpoint": {"every_steps": 1, "keep_last": 10},
        **extra})


def test_ema_equals_the_reference_recursion_over_the_checkpointed_weights(make_config, tmp_path):
    out = tmp_path / "run"
    train(ema_cfg(make_config, out), log=quiet)
    weights = {t: load_file(out / "checkpoints" / f"step_{t:06d}" / "lora_state.safetensors") for t in range(1, STEPS + 1)}
    got = load_file(out / "checkpoints" / f"step_{STEPS:06d}" / "ema.safetensors")
    assert got.keys() == weights[1].keys()
    # Reference in float64: the average follows the weights before START, then ema = d·ema + (1 − d)·w_t.
    for key in got:
        ref = weights[1][key].double()
        for t in range(START, STEPS + 1):
            ref = DECAY * ref + (1 - DECAY) * weights[t][key].double()
        # 3 fp32 multiply-adds on values of the tensor's scale: each rounds by at most 1 ulp (6e-8 relative).
        scale = float(ref.abs().max()) or 1.0
        assert float((got[key].double() - ref).abs().max()) <= 1e-6 * scale, key
    trained = [k for k in got if not torch.equal(weights[1][k], weights[STEPS][k])]
    assert trained and any(not torch.equal(got[k], weights[STEPS][k]) for k in trained)  # the average lags the weights
    # The exported average is the checkpoint's average, in the adapter layout, beside the raw adapter.
    final, in_checkpoint = (load_file(p / "adapter_ema.safetensors") for p in (out, out / "checkpoints" / f"step_{STEPS:06d}"))
    raw = load_file(out / "adapter.safetensors")
    assert final.keys() == raw.keys() and all(torch.equal(final[k], in_checkpoint[k]) for k in final)
    assert any(not torch.equal(final[k], raw[k]) for k in final)


def test_ema_survives_kill_and_resume_bit_identically(make_config, tmp_path):
    full = tmp_path / "full"
    train(ema_cfg(make_config, full, checkpoint={"every_steps": 2, "keep_last": 3}), log=quiet)
    out = tmp_path / "run"
    cfg = ema_cfg(make_config, out, checkpoint={"every_steps": 2, "keep_last": 3})

    def interrupt_at_3(step, loss):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    with pytest.raises(TrainingInterrupted):
        train(cfg, fault_hook=interrupt_at_3, log=quiet)
    train(cfg, resume="latest", log=quiet)
    for name in ("adapter_ema.safetensors", f"checkpoints/step_{STEPS:06d}/ema.safetensors"):
        a, b = load_file(out / name), load_file(full / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_export_ema_from_a_run_folder_in_the_kohya_layout(make_config, tmp_path):
    out = tmp_path / "run"
    train(make_config(output={"dir": str(out)}, train={"max_steps": 2, "ema": {"enabled": True, "decay": 0.5}}), log=quiet)
    kohya = run_export(out, "kohya", tmp_path / "ema_kohya.safetensors", ema=True, report=quiet)
    raw = run_export(out, "kohya", tmp_path / "raw_kohya.safetensors", report=quiet)
    a, b = load_file(kohya), load_file(raw)
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    no_ema = tmp_path / "plain"
    train(make_config(output={"dir": str(no_ema)}, train={"max_steps": 1}), log=quiet)
    with pytest.raises(UserError, match="holds no adapter_ema.safetensors"):
        run_export(no_ema, "kohya", tmp_path / "x.safetensors", ema=True, report=quiet)
