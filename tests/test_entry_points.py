"""`sdlora train --config configs/demo.yaml` and `accelerate launch train.py --config ...` both run."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _overrides(tiny_model, shapes_data, out):
    return ["--set", f"model.path={tiny_model}", "--set", f"data.path={shapes_data}", "--set", f"output.dir={out}",
            "--set", "train.max_steps=3", "--set", "optim.warmup_steps=0", "--set", "log.tracker=none"]  # warm-up <= steps


def _run(cmd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


def test_sdlora_train_runs_the_demo_config(tiny_model, shapes_data, tmp_path):
    proc = _run([sys.executable, "-m", "sdlora.cli", "train", "--config", "configs/demo.yaml",
                 *_overrides(tiny_model, shapes_data, tmp_path / "run")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "run" / "adapter.safetensors").is_file()


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not on PATH")
def test_accelerate_launch_runs_train_py(tiny_model, shapes_data, tmp_path):
    proc = _run(["accelerate", "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                 "--dynamo_backend", "no", "train.py", "--config", "configs/demo.yaml",
                 *_overrides(tiny_model, shapes_data, tmp_path / "run")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "run" / "adapter.safetensors").is_file()


def test_importing_the_pipelines_prints_no_torchvision_fallback_lines_and_keeps_other_warnings():
    """transformers warns, on importing diffusers' pipelines without torchvision, that it falls back to PIL image
    processors: noise for sdlora (it never uses them), dropped by sdlora/util/quiet_imports.py; any other warning
    on the same logger still shows. (Where torchvision is installed the lines never come, and this passes too.)"""
    code = ("import logging, sdlora\n"
            "from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline\n"
            "logging.getLogger('transformers.utils.import_utils').warning('another warning')\n")
    proc = _run([sys.executable, "-c", code])
    assert proc.returncode == 0, proc.stderr
    assert "requires torchvision" not in proc.stderr + proc.stdout
    assert "another warning" in proc.stderr
