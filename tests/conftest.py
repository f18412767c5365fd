"""Shared fixtures: a tiny SD model and a small captioned dataset, built once per session, offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from sdlora.config import validate  # noqa: E402
from sdlora.commands.demo import make_shapes_dataset  # noqa: E402
from sdlora.model.tiny import make_tiny_model  # noqa: E402
from sdlora.model.tiny_sd3 import make_tiny_sd3  # noqa: E402

# Two threads, as CI's machine has two cores; OMP_NUM_THREADS=1 runs the suite beside another torch process
# without the two oversubscribing the cores (each slows 5-50x then).
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


# Tiny SD3-family models (model/tiny_sd3.py), built once per session on first use.
@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    return make_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3") / "model", seed=0, variant="sd3")


@pytest.fixture(scope="session")
def tiny_sd3_no_t5(tmp_path_factory):
    return make_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3_no_t5") / "model", seed=0, variant="sd3-no-t5")


@pytest.fixture(scope="session")
def tiny_sd35m(tmp_path_factory):
    return make_tiny_sd3(tmp_path_factory.mktemp("tiny_sd35m") / "model", seed=0, variant="sd35m")


@pytest.fixture(scope="session")
def tiny_sd35l(tmp_path_factory):
    return make_tiny_sd3(tmp_path_factory.mktemp("tiny_sd35l") / "model", seed=0, variant="sd35l")


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", n=8)


def deep_update(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = v
    return base


@pytest.fixture
def make_config(tiny_model, shapes_data, tmp_path):
    """Build a validated config for a short CPU run on the tiny model; nested dict overrides."""

    def build(extra: dict | None = None, **kw):
        d = {
            "model": {"path": str(tiny_model)},
            "data": {"path": str(shapes_data), "resolution": 64},
            "output": {"dir": str(tmp_path / "run")},
            "train": {"max_steps": 10, "batch_size": 2, "seed": 0},
            "optim": {"lr": 1e-3, "max_grad_norm": None},
            "lora": {"rank": 4, "alpha": 4},
            "log": {"tracker": "none"},
        }
        return validate(deep_update(deep_update(d, extra or {}), kw))

    return build
