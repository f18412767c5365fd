"""Every ready config in configs/ validates against the schema."""

from pathlib import Path

import pytest

from sdlora.config import load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.*"))


def test_the_ready_configs_are_there():
    names = {p.name for p in CONFIGS}
    assert {"sd15-character.yaml", "sd15-style.yaml", "sd2-768v.yaml", "sdxl-character.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_file_validates(path):
    cfg = load_config(path)
    assert cfg.output.dir and cfg.train.max_steps >= 1
