"""sdlora-mini: the shipped model loads like any SD 1.x folder, the judge is accurate on real renders, and the
demo's two failure paths (missing extra, SIGTERM) end in one line."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sdlora.mini import MINI_MODEL_DIR
from sdlora.mini.data import CONCEPT, HELD_OUT, digit_renders, glyph_renders
from sdlora.mini.judge import Judge, accuracy_on_real_renders

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def judge():
    return Judge.fit()


def test_the_judge_is_at_least_97_percent_right_on_renders_of_scans_it_never_saw(judge):
    acc = accuracy_on_real_renders(judge, n_digits=1500, n_glyphs=150)
    assert acc["digit"] >= 0.97 and acc["concept"] >= 0.97 and acc["concept_2"] >= 0.97 and acc["colour"] >= 0.97, acc


def test_the_judge_names_every_stroke_and_background_colour_of_the_palette():
    from sdlora.mini.data import BACKGROUNDS, STROKES, digit_scans, render
    from sdlora.mini.judge import read_colours

    scan = digit_scans()[0][0]
    rng = np.random.default_rng(0)
    for stroke in STROKES:
        for bg in BACKGROUNDS:
            assert read_colours(render(scan, stroke, bg, rng))[:2] == (stroke, bg)


def test_training_data_leaves_the_held_out_pairs_out():
    _, labels, strokes, _, captions = digit_renders(2000, seed=0)
    assert not any((s, int(k)) in HELD_OUT for s, k in zip(strokes, labels))
    assert len(set(captions)) > 100
    assert set(glyph_renders(18, 0)[1]) == {CONCEPT}


def test_the_shipped_mini_model_loads_in_diffusers_and_in_sdlora():
    import torch

    from sdlora.mini.skill import load_pipeline, sample
    from sdlora.model.loading import load_components

    assert (MINI_MODEL_DIR / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    comps = load_components(str(MINI_MODEL_DIR))
    assert comps.base_model_version == "sd_v1" and comps.prediction_type == "epsilon"
    assert len(comps.tokenizer) == 49408  # the real CLIP vocabulary
    pipe = load_pipeline(MINI_MODEL_DIR)
    assert pipe.unet.dtype == torch.float32
    (img,) = sample(pipe, ["a red seven on a navy background"], [0], steps=5)
    assert img.shape == (32, 32, 3)


BLOCK_DEMO_EXTRA = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):  # as if the `demo` extra were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'peft', 'matplotlib', 'sklearn'}:
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, Block())
from sdlora.cli import main
sys.exit(main(['demo', '--out', sys.argv[1]]))
"""


def test_the_demo_without_its_extra_names_what_to_install_before_training(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-c", BLOCK_DEMO_EXTRA, str(out)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "peft, matplotlib, scikit-learn" in err[0] and "pip install 'sdlora[demo]'" in err[0]
    assert not out.exists()  # nothing was built or trained


def test_the_demo_stopped_by_sigterm_prints_the_one_line_stop_message(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sdlora.cli", "demo", "--out", str(out), "--steps", "5000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = out / "run" / "metrics.jsonl"
    t0 = time.monotonic()
    while not (metrics.is_file() and metrics.read_text().strip()):  # the loop runs (a step was logged)
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < 240
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "TrainingInterrupted" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("sdlora:")]
    assert len(lines) == 1 and lines[0].startswith("sdlora: interrupted by SIGTERM after step "), err
