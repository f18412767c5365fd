"""A leading `~` is the user's home in every path of the config and of the command line (issue 25, section 4): no
folder literally named `~` appears in the working directory."""

import shutil
import typing

import pytest
from pydantic import BaseModel

from sdlora.cli import main as cli_main
from sdlora.config import Config, validate
from sdlora.training.loop import train

PATH_NAME = ("path", "dir", "_from", "_file")  # how the schema names a file or folder key


def _section(annotation):
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((s for a in typing.get_args(annotation) if (s := _section(a)) is not None), None)


def _has_str(annotation) -> bool:
    return annotation is str or any(_has_str(a) for a in typing.get_args(annotation))


def path_keys(model=Config, prefix=""):
    for name, f in model.model_fields.items():
        sub = _section(f.annotation)
        if sub is not None:
            if typing.get_origin(f.annotation) is not list and not any(
                    typing.get_origin(a) is list for a in typing.get_args(f.annotation)):
                yield from path_keys(sub, f"{prefix}{name}.")
        elif name.endswith(PATH_NAME) and _has_str(f.annotation):
            yield f"{prefix}{name}"


PATH_KEYS = sorted(path_keys())
COMPANIONS = {  # what a key needs beside it to be valid
    "data.mask_dir": {"data": {"path": "d", "masked_loss": True}},
    "reg.preservation.prompts_file": {"reg": {"preservation": {"weight": 1.0, "source": "file"}}},
}


def test_the_schema_walk_finds_the_paths():
    assert {"model.path", "model.vae_path", "model.config_dir", "data.path", "output.dir", "lora.init_from"} <= \
        set(PATH_KEYS), PATH_KEYS


@pytest.mark.parametrize("key", PATH_KEYS)
def test_every_path_setting_expands_a_leading_tilde(key, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    data = {"model": {"path": "m"}, "data": {"path": "d"}, "output": {"dir": "o"}, **COMPANIONS.get(key, {})}
    section, name = key.rsplit(".", 1)
    node = data
    for part in section.split("."):
        node = node.setdefault(part, {})
    node[name] = "~/somewhere"
    cfg = validate(data)
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    assert value == str(tmp_path / "somewhere")


def test_subset_paths_expand_a_leading_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    from sdlora.config import SubsetConfig

    keys = list(path_keys(SubsetConfig))
    assert "path" in keys
    cfg = validate({"model": {"path": "m"}, "output": {"dir": "o"},
                    "data": {"subsets": [{k: f"~/{k}" for k in keys}]}})
    for k in keys:
        assert getattr(cfg.data.subsets[0], k) == str(tmp_path / k)


def test_a_run_with_tilde_paths_writes_under_home_not_into_a_folder_named_tilde(tiny_model, shapes_data, tmp_path,
                                                                                 monkeypatch):
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    shutil.copytree(shapes_data, home / "data")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    cfg = validate({"model": {"path": str(tiny_model)}, "data": {"path": "~/data", "resolution": 64},
                    "output": {"dir": "~/runs/x"}, "train": {"max_steps": 1, "batch_size": 2},
                    "lora": {"rank": 4, "alpha": 4}, "log": {"tracker": "none"}})
    train(cfg, log=lambda *a, **k: None)
    assert (home / "runs" / "x" / "adapter.safetensors").is_file()
    assert not (work / "~").exists()
    # the command line: a `--out=~/...` the shell did not expand
    assert cli_main(["export", "~/runs/x", "--format", "kohya", "--out=~/k.safetensors"]) == 0
    assert (home / "k.safetensors").is_file() and not (work / "~").exists()
    assert cli_main(["resize", "--out=~/r.safetensors", "--rank", "2", "~/k.safetensors"]) == 0
    assert cli_main(["inspect", "~/r.safetensors", "--out=~/report"]) == 0
    assert (home / "r.safetensors").is_file() and (home / "report" / "inspect.json").is_file()
    assert not (work / "~").exists()
