"""Real processes killed and interrupted; bad models and configs give one line and exit 2, never a traceback."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from sdlora.cli import main
from sdlora.config import load_config
from sdlora.errors import UserError
from sdlora.training.loop import train

N = 16
TOL = 1e-6


def write_config(path, tiny_model, shapes_data, out, **extra):
    d = {"model": {"path": str(tiny_model)}, "data": {"path": str(shapes_data), "resolution": 64},
         "output": {"dir": str(out)}, "train": {"max_steps": N, "batch_size": 2, "seed": 0},
         "optim": {"lr": 1e-3, "scheduler": "linear", "warmup_steps": 2}, "lora": {"rank": 4, "alpha": 4},
         "log": {"tracker": "none"}, "checkpoint": {"every_steps": 2, "keep_last": 2}, **extra}
    path.write_text(yaml.safe_dump(d))
    return path


def cli(*args):
    # The same thread count as this process: the killed run and its in-process resume reduce in the same order.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.Popen([sys.executable, "-m", "sdlora.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def max_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def reference(tiny_model, shapes_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    cfg = load_config(write_config(root / "c.yaml", tiny_model, shapes_data, root / "run"))
    train(cfg, log=lambda *a: None)
    return load_file(root / "run" / "adapter.safetensors")


def wait_for(predicate, proc, timeout=240):
    t0 = time.monotonic()
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout
        time.sleep(0.05)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_run_killed_with_sigkill_then_resumed_equals_the_uninterrupted_run(seed, tiny_model, shapes_data, tmp_path,
                                                                            reference):
    out = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_model, shapes_data, out)
    proc = cli("train", "--config", str(config))
    wait_for(lambda: (out / "checkpoints" / "step_000002").is_dir(), proc)
    time.sleep(random.Random(seed).uniform(0.0, 1.0))  # a random later step, possibly mid-save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads((out / "run.json").read_text())["status"]
    assert proc.returncode == -signal.SIGKILL and killed_at == "running"
    result = train(load_config(config), resume="latest", log=lambda *a: None)
    assert result.step == N
    assert max_diff(load_file(out / "adapter.safetensors"), reference) <= TOL


def test_sigint_saves_a_checkpoint_and_prints_a_resume_command_that_works(tiny_model, shapes_data, tmp_path, reference):
    out = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_model, shapes_data, out, checkpoint={"every_steps": 4})
    proc = cli("train", "--config", str(config))
    # Once the loop runs (the first checkpoint exists); a Ctrl-C during model loading is a plain KeyboardInterrupt.
    wait_for(lambda: (out / "checkpoints" / "step_000004").is_dir(), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err
    message = next(line for line in err.splitlines() if "interrupted by" in line)
    assert message.startswith("sdlora: interrupted by SIGINT after step ") and "Traceback" not in err
    command = message.split("resume with: ")[1].split()
    assert command[:2] == ["sdlora", "train"] and command[-2:] == ["--resume", "latest"]
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    resumed = cli(*command[1:])  # the printed command, run through this interpreter
    _, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err
    assert max_diff(load_file(out / "adapter.safetensors"), reference) <= TOL


# ------------------------------------------------------------------------------------------ bad input
def run_cli(capsys, *args):
    code = main(list(args))
    err = capsys.readouterr().err.strip()
    return code, err


def bad_model_config(tmp_path, shapes_data, model_path, **lora):
    return str(write_config(tmp_path / "c.yaml", model_path, shapes_data, tmp_path / "out", lora={"rank": 4, **lora}))


@pytest.mark.parametrize("kind", ["missing", "empty folder", "not a checkpoint"])
def test_a_bad_model_path_is_one_line_and_exit_2(kind, tmp_path, shapes_data, capsys):
    model = tmp_path / "model"
    if kind == "empty folder":
        model.mkdir()
    elif kind == "not a checkpoint":
        model = tmp_path / "model.safetensors"
        save_file({"weight": torch.zeros(3)}, str(model))
    code, err = run_cli(capsys, "train", "--config", bad_model_config(tmp_path, shapes_data, model))
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: model.path"), err
    with pytest.raises(UserError):
        main(["train", "--config", bad_model_config(tmp_path, shapes_data, model), "--debug"])


def test_an_init_alphas_adapter_that_does_not_fit_is_one_line_and_exit_2(tmp_path, tiny_model, shapes_data, capsys):
    other = tmp_path / "other.safetensors"
    save_file({"unet.nothing.alpha": torch.ones(())}, str(other))
    code, err = run_cli(capsys, "train", "--config",
                        bad_model_config(tmp_path, shapes_data, tiny_model, init_alphas_from=str(other)))
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err


# ------------------------------------------------------------------------------------------------ fuzz
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10 ** 6), st.floats(allow_nan=True),
                    st.text(max_size=8), st.lists(st.integers(), max_size=3))
SECTIONS = ["model", "data", "output", "train", "optim", "lora", "text_encoder", "loss", "reg", "sample",
            "checkpoint", "export", "log", "bogus"]
KEYS = ["path", "dir", "max_steps", "batch_size", "lr", "scheduler", "rank", "alpha", "init", "type",
        "min_snr_gamma", "every_steps", "prompts", "keep_last", "resolution", "tracker", "subsets", "lr_rules",
        "min_timestep", "max_timestep", "betas", "rnak"]
sections = st.dictionaries(st.sampled_from(SECTIONS),
                           st.one_of(scalars, st.dictionaries(st.sampled_from(KEYS), scalars, max_size=5)), max_size=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=sections, base=st.booleans())
def test_fuzzed_configs_validate_or_fail_with_one_line_and_exit_2(data, base, tmp_path):
    if base:  # half the examples start from a valid config, so deeper keys get reached
        data = {"model": {"path": "m"}, "data": {"path": "d"}, "output": {"dir": "o"}, **data}
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        load_config(path)
    except UserError as e:
        assert len(str(e).splitlines()) == 1 and str(e)
        code = main(["train", "--config", str(path)])
        assert code == 2
