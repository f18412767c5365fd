"""Process state a run leaves behind, however it ends: signal handlers restored, run.json never left "running"."""

import json
import os
import signal
import time

import pytest

import sdlora.util.atomic
from sdlora.training.checkpoint import list_checkpoints, verify_checkpoint
from sdlora.training.loop import train


def quiet(*a, **k):
    pass


def test_an_exception_in_the_loop_restores_the_signal_handlers(make_config, tmp_path):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def boom(step, loss):
        if step == 2:
            raise RuntimeError("a fault in the loop")
        return loss

    with pytest.raises(RuntimeError, match="a fault in the loop"):
        train(make_config(train={"max_steps": 3}, output={"dir": str(tmp_path / "run")}), fault_hook=boom, log=quiet)
    assert {s: signal.getsignal(s) for s in before} == before
    with pytest.raises(KeyboardInterrupt):  # the next Ctrl-C in this process is not swallowed
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)


def test_a_second_ctrl_c_during_the_stop_save_marks_the_run_interrupted(make_config, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = make_config(train={"max_steps": 6}, output={"dir": str(out)}, checkpoint={"every_steps": 2, "keep_last": 3})
    state = {"first": False}

    def first_ctrl_c(step, loss):
        if step == 3:
            state["first"] = True
            os.kill(os.getpid(), signal.SIGINT)  # real signal: the loop finishes step 3 and saves
        return loss

    fsync_dir = sdlora.util.atomic._fsync_dir

    def second_ctrl_c_mid_save(folder):
        if state["first"] and ".staging-step_000003" in str(folder):
            state["first"] = False
            os.kill(os.getpid(), signal.SIGINT)  # the default handler is back: KeyboardInterrupt, at once
            time.sleep(5)
        fsync_dir(folder)

    monkeypatch.setattr(sdlora.util.atomic, "_fsync_dir", second_ctrl_c_mid_save)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, fault_hook=first_ctrl_c, log=quiet)
    status = json.loads((out / "run.json").read_text())
    assert status["status"] == "interrupted", status
    intact = [p for p in list_checkpoints(out) if verify_checkpoint(p) is None]
    assert [p.name for p in intact] == ["step_000002"]  # the torn save left nothing; the last good one is intact
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
