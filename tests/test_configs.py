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


def test_the_demo_config_is_the_demo_s_recipe():
    """configs/demo.yaml is what `sdlora demo` trains (demo_recipe, the quality table's row demo), with its paths
    relative to the repository's root: one recipe, so the config cannot drift from what the table measured."""
    import yaml

    from sdlora.commands.demo import DEMO_STEPS, demo_recipe
    from sdlora.mini import MINI_MODEL_DIR

    root = Path(__file__).parent.parent
    shipped = yaml.safe_load((root / "configs" / "demo.yaml").read_text())
    recipe = demo_recipe(Path("sdlora-demo"), DEMO_STEPS)
    assert (root / shipped["model"]["path"]).resolve() == MINI_MODEL_DIR.resolve()
    for cfg in (shipped, recipe):
        cfg["model"].pop("path")
        cfg["output"].pop("dir")
    assert shipped == recipe
