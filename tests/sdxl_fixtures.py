"""The tiny SDXL model and a config builder for it (import both fixtures into a test module to use them)."""

import pytest

from sdlora.config import validate
from sdlora.model.tiny import make_tiny_sdxl


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return make_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "model", seed=0)


@pytest.fixture
def sdxl_config(tiny_sdxl, shapes_data, tmp_path):
    from conftest import deep_update

    def build(extra: dict | None = None, **kw):
        d = {"model": {"path": str(tiny_sdxl)}, "data": {"path": str(shapes_data), "resolution": 64},
             "output": {"dir": str(tmp_path / "run")}, "train": {"max_steps": 6, "batch_size": 2, "seed": 0},
             "optim": {"lr": 1e-3, "max_grad_norm": None}, "lora": {"rank": 4, "alpha": 4}, "log": {"tracker": "none"}}
        return validate(deep_update(deep_update(d, extra or {}), kw))

    return build
