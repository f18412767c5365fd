"""Checkpoints: exact resume, atomic saves that survive interruption and a full disk, non-finite steps."""

import errno
import json
import os
import shutil
import signal

import pytest
from safetensors.torch import load_file

import sdlora.util.atomic
import sdlora.training.checkpoint as ckpt
from sdlora.cli import main as cli_main
from sdlora.errors import UserError
from sdlora.training.signals import TrainingInterrupted
from sdlora.training.nonfinite import NonFiniteLoss
from sdlora.training.loop import train

TOL = 1e-6  # CPU fp32, same ops in the same order: in practice the result is bit-identical
N = 6


def quiet(*a, **k):
    pass


def run_cfg(make_config, out, **extra):
    return make_config({"output": {"dir": str(out)}, "train": {"max_steps": N, "batch_size": 2},
                        "optim": {"scheduler": "cosine", "warmup_steps": 2, "max_grad_norm": 1.0},
                        "checkpoint": {"every_steps": 2, "keep_last": 2}, **extra})


def interrupt_at(step_to_stop):
    """A real SIGINT delivered to this process during step `step_to_stop`."""
    def hook(step, loss):
        if step == step_to_stop:
            os.kill(os.getpid(), signal.SIGINT)
        return loss
    return hook


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def lrs(out):
    return [{k: v for k, v in json.loads(line).items() if k.startswith("lr/") or k == "step"}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, shapes_data, tmp_path_factory):
    from sdlora.config import validate

    out = tmp_path_factory.mktemp("full") / "run"
    cfg = validate({"model": {"path": str(tiny_model)}, "data": {"path": str(shapes_data), "resolution": 64},
                    "output": {"dir": str(out)}, "train": {"max_steps": N, "batch_size": 2, "seed": 0},
                    "optim": {"lr": 1e-3, "scheduler": "cosine", "warmup_steps": 2, "max_grad_norm": 1.0},
                    "lora": {"rank": 4, "alpha": 4}, "log": {"tracker": "none"},
                    "checkpoint": {"every_steps": 2, "keep_last": 2}})
    train(cfg, log=quiet)
    return out


def test_interrupted_and_resumed_run_equals_the_uninterrupted_run(make_config, tmp_path, uninterrupted):
    out = tmp_path / "run"
    cfg = run_cfg(make_config, out)
    with pytest.raises(TrainingInterrupted) as info:
        train(cfg, fault_hook=interrupt_at(3), log=quiet)
    assert info.value.exit_code == 130 and "--resume latest" in str(info.value)
    assert (out / "checkpoints" / "step_000003").is_dir()  # the stop checkpoint, off the every_steps grid
    messages = []
    result = train(cfg, resume="latest", log=messages.append)
    assert result.step == N
    assert f"trained steps 4-{N} ({N - 3}) in " in messages[-1], messages[-1]  # the steps this launch ran
    assert max_diff(load_file(out / "adapter.safetensors"), load_file(uninterrupted / "adapter.safetensors")) <= TOL
    assert lrs(out) == lrs(uninterrupted)  # the same LR at every step, one metrics line per step
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


def test_a_save_interrupted_before_its_manifest_leaves_the_last_good_checkpoint_in_use(make_config, tmp_path,
                                                                                      monkeypatch, uninterrupted):
    out = tmp_path / "run"
    cfg = run_cfg(make_config, out)
    real = ckpt.write_manifest

    def killed_at_step_4(folder, step):
        if step == 4:
            raise KeyboardInterrupt  # the writer dies after every data file, before the manifest
        return real(folder, step)

    monkeypatch.setattr(ckpt, "write_manifest", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, log=quiet)
    monkeypatch.undo()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [".staging-step_000004", "step_000002"]
    messages = []
    result = train(cfg, resume="latest", log=messages.append)
    assert any("resumed from" in m and "step_000002" in m for m in messages)
    assert max_diff(load_file(out / "adapter.safetensors"), load_file(uninterrupted / "adapter.safetensors")) <= TOL
    assert result.step == N and not list((out / "checkpoints").glob(".staging-*"))


def test_a_corrupt_newest_checkpoint_is_reported_and_the_previous_one_used(make_config, tmp_path):
    out = tmp_path / "run"
    train(run_cfg(make_config, out), log=quiet)  # keeps step 4 and step 6
    newest = out / "checkpoints" / "step_000006"
    with open(newest / "optimizer.pt", "r+b") as f:  # flip one byte: same size, wrong hash
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert "SHA-256" in ckpt.verify_checkpoint(newest)
    messages = []
    assert ckpt.find_checkpoint(out, "latest", messages.append).name == "step_000004"
    assert "skipping" in messages[0] and "step_000006" in messages[0]
    with pytest.raises(UserError, match="corrupt"):
        ckpt.find_checkpoint(out, str(newest))
    (newest / "manifest.json").unlink()
    assert "incomplete" in ckpt.verify_checkpoint(newest)


def test_a_full_disk_during_a_save_is_a_clear_error_and_keeps_the_previous_checkpoint(make_config, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = run_cfg(make_config, out)
    real_fsync = os.fsync

    def fsync(fd):
        if "step_000004" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(sdlora.util.atomic.os, "fsync", fsync)
    with pytest.raises(UserError, match=r"step 4 .*disk is full.*step_000002 is intact"):
        train(cfg, log=quiet)
    monkeypatch.undo()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000002"]  # no staging debris
    assert ckpt.verify_checkpoint(out / "checkpoints" / "step_000002") is None


def nan_at(steps):
    def hook(step, loss):
        return loss * float("nan") if step in steps else loss
    return hook


def test_nonfinite_steps_are_skipped_and_counted(make_config, tmp_path):
    out = tmp_path / "run"
    cfg = run_cfg(make_config, out, checkpoint={"every_steps": 1, "keep_last": 10})
    train(cfg, fault_hook=nan_at({3, 4}), log=quiet)
    state = {s: load_file(out / "checkpoints" / f"step_{s:06d}" / "lora_state.safetensors") for s in (2, 4, 5)}
    assert max_diff(state[2], state[4]) == 0  # steps 3 and 4 made no update at all
    assert max_diff(state[4], state[5]) > 0  # step 5 trained again
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["nonfinite_steps"] for x in lines] == [0, 0, 1, 2, 2, 2] and lines[2]["loss"] is None


def test_too_many_consecutive_nonfinite_steps_stop_the_run_keeping_the_last_good_state(make_config, tmp_path):
    out = tmp_path / "run"
    cfg = run_cfg(make_config, out, train={"max_steps": N, "batch_size": 2, "max_nonfinite_steps": 3},
                  checkpoint={"every_steps": 2, "keep_last": 10})
    with pytest.raises(NonFiniteLoss, match=r"step 5: 3 consecutive non-finite") as info:
        train(cfg, fault_hook=nan_at({3, 4, 5, 6}), log=quiet)
    assert info.value.exit_code == 3
    good = load_file(out / "checkpoints" / "step_000002" / "lora_state.safetensors")
    assert max_diff(load_file(out / "checkpoints" / "step_000005" / "lora_state.safetensors"), good) == 0
    assert json.loads((out / "run.json").read_text())["status"] == "stopped_nonfinite"
    assert (out / "adapter.safetensors").is_file()


def test_an_output_folder_with_a_run_is_not_overwritten_without_resume_or_overwrite(make_config, tmp_path):
    out = tmp_path / "run"
    cfg = run_cfg(make_config, out, train={"max_steps": 2, "batch_size": 2})
    train(cfg, log=quiet)
    with pytest.raises(UserError, match="already holds a finished run"):
        train(cfg, log=quiet)
    (out / "logs").mkdir()
    (out / "logs" / "events.out.tfevents.old").write_bytes(b"")  # the old run's tracker files
    (out / "samples" / "step_000500").mkdir(parents=True)  # the old run's training samples (a longer run)
    (out / "samples" / "step_000500" / "0.png").write_bytes(b"")
    (out / "adapter_ema.safetensors").write_bytes(b"old")  # the old run's EMA export (this run has no EMA)
    train(cfg, overwrite=True, log=quiet)  # replaces it; the old checkpoints, logs, samples and exports go with it
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000002"]
    assert not (out / "logs").exists()  # TensorBoard would otherwise draw both runs as one
    assert not (out / "samples").exists()  # nor would the new run's samples sit beside the old run's
    assert not (out / "adapter_ema.safetensors").exists()  # nor an old export beside the new run's adapter


def files_under(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_bad_input_with_overwrite_or_resume_exits_2_and_leaves_the_old_run_byte_identical(make_config, shapes_data,
                                                                                          tmp_path, capsys):
    out = tmp_path / "run"
    train(run_cfg(make_config, out, train={"max_steps": 2, "batch_size": 2}), log=quiet)
    capsys.readouterr()  # the run's progress bar
    before = files_under(out)
    assert {"run.json", "config.yaml", "metrics.jsonl", "adapter.safetensors"} <= set(before)
    assert json.loads(before["run.json"])["status"] == "finished"
    bad_data = tmp_path / "bad_data"
    shutil.copytree(shapes_data, bad_data)
    (bad_data / "zz_corrupt.png").write_bytes(b"not an image\n")
    command = ["train", "--config", str(out / "config.yaml")]  # the config the run wrote, as a user would rerun it
    for extra in (["--overwrite", "--set", f"model.path={tmp_path / 'nope'}"],
                  ["--overwrite", "--set", f"data.path={bad_data}", "--set", "data.on_error=fail"],
                  ["--resume", "latest", "--set", f"model.path={tmp_path / 'nope'}"]):
        assert cli_main(command + extra) == 2, extra
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
        assert files_under(out) == before, extra  # checkpoints, logs, adapter and run.json ("finished") untouched
    assert ckpt.find_checkpoint(out, "latest", quiet).name == "step_000002"


def test_resume_with_nothing_to_resume_is_a_one_line_error(make_config, tmp_path):
    cfg = run_cfg(make_config, tmp_path / "run")
    with pytest.raises(UserError, match="no intact checkpoint"):
        train(cfg, resume="latest", log=quiet)
    with pytest.raises(UserError, match="no such checkpoint folder"):
        train(cfg, resume=str(tmp_path / "nope"), log=quiet)


def test_keep_adapters_keeps_every_checkpoint_s_adapter_in_both_layouts_when_checkpoints_are_pruned(make_config,
                                                                                                    tmp_path):
    """checkpoint.keep_adapters: with one checkpoint kept, each checkpoint's adapter stays under adapters/ (the same
    bytes as the checkpoint held; the last one equals the run's adapter.safetensors, same step), each with its
    kohya-layout twin; --overwrite clears them with the old run."""
    from sdlora.adapter.io import load_adapter

    out = tmp_path / "run"
    cfg = run_cfg(make_config, out, checkpoint={"every_steps": 2, "keep_last": 1, "keep_adapters": True})
    train(cfg, log=quiet)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000006"]  # the older ones were pruned
    kept = sorted(p.name for p in (out / "adapters").iterdir())
    assert kept == [f"step_{s:06d}{tail}.safetensors" for s in (2, 4, 6) for tail in ("", "_kohya")]
    last = out / "adapters" / "step_000006.safetensors"
    assert last.read_bytes() == (out / "checkpoints" / "step_000006" / "adapter.safetensors").read_bytes()
    assert max_diff(load_file(last), load_file(out / "adapter.safetensors")) == 0
    early, late = (load_adapter(out / "adapters" / f"step_{s:06d}_kohya.safetensors") for s in (2, 6))
    assert early.modules.keys() == late.modules.keys() and early.modules  # a real adapter per step, steps apart
    assert max_diff(load_file(out / "adapters" / "step_000002.safetensors"), load_file(last)) > 0
    train(cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"keep_adapters": False})}),
          overwrite=True, log=quiet)
    assert not (out / "adapters").exists()
