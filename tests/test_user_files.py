"""sdlora never destroys a user's files: only what it wrote for a run (or an output) it can identify may be removed or
replaced; anything else is a one-line refusal naming the folder or file, exit 2 (issue 25, section 2)."""

import json

import pytest

from sdlora.cli import main as cli_main
from sdlora.errors import UserError
from sdlora.training.loop import train


def quiet(*a, **k):
    pass


def files_under(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def users_folder(root):
    """A folder that never held an sdlora run (no run.json) but has folders and files of the names a run writes."""
    root.mkdir(parents=True)
    for sub in ("samples", "logs", "checkpoints"):
        (root / sub).mkdir()
        (root / sub / "mine.png").write_bytes(b"the user's own " + sub.encode())
    (root / "config.yaml").write_text("# my own notes, not an sdlora config\n")
    return root


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_run_into_a_folder_that_never_held_a_run_destroys_nothing(make_config, tmp_path, overwrite, capsys):
    out = users_folder(tmp_path / "mine")
    before = files_under(out)
    cfg = make_config(output={"dir": str(out)}, train={"max_steps": 1})
    with pytest.raises(UserError, match="no sdlora run") as info:
        train(cfg, overwrite=overwrite, log=quiet)
    assert str(out) in str(info.value) and "\n" not in str(info.value)
    assert files_under(out) == before  # samples/, logs/, checkpoints/ and config.yaml untouched


def test_a_folder_with_only_other_files_takes_a_run_and_keeps_them(make_config, tmp_path):
    out = tmp_path / "shared"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    train(make_config(output={"dir": str(out)}, train={"max_steps": 1}), log=quiet)
    assert (out / "notes.txt").read_text() == "mine" and (out / "adapter.safetensors").is_file()
    train(make_config(output={"dir": str(out)}, train={"max_steps": 1}), overwrite=True, log=quiet)  # now a run
    assert (out / "notes.txt").read_text() == "mine"


def test_a_run_json_sdlora_did_not_write_is_a_one_line_refusal(make_config, tmp_path, capsys):
    out = tmp_path / "other"
    out.mkdir()
    (out / "run.json").write_text("not json at all")
    cfg = make_config(output={"dir": str(out)}, train={"max_steps": 1})
    (tmp_path / "c.yaml").write_text(json.dumps(cfg.to_dict()))
    capsys.readouterr()
    assert cli_main(["train", "--config", str(tmp_path / "c.yaml"), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert str(out) in err and len(err.splitlines()) == 1, err
    assert (out / "run.json").read_text() == "not json at all"


# --------------------------------------------------------------------- outputs of the commands
@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model, shapes_data):
    from sdlora.config import validate

    out = tmp_path_factory.mktemp("own") / "run"
    train(validate({"model": {"path": str(tiny_model)}, "data": {"path": str(shapes_data), "resolution": 64},
                    "output": {"dir": str(out)}, "train": {"max_steps": 1, "batch_size": 2, "seed": 0},
                    "lora": {"rank": 4, "alpha": 4}, "log": {"tracker": "none"}}), log=quiet)
    return out / "adapter.safetensors"


def someone_elses_file(path):
    """A .safetensors sdlora did not write (say, the user's base model): no sdlora.* metadata."""
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(path), metadata={"modelspec.title": "my model"})
    return path


COMMANDS = {
    "export": lambda a, m, out: ["export", str(a), "--format", "diffusers", "--out", str(out), "--force"],
    "export-kohya": lambda a, m, out: ["export", str(a), "--format", "kohya", "--out", str(out), "--force"],
    "export-merged-single-file": lambda a, m, out: ["export", str(a), "--format", "merged-single-file", "--base", str(m),
                                                    "--out", str(out), "--force"],
    "merge": lambda a, m, out: ["merge", str(a), str(a), "--out", str(out), "--force"],
    "resize": lambda a, m, out: ["resize", str(a), "--rank", "2", "--out", str(out), "--force"],
    "extract": lambda a, m, out: ["extract", "--base", str(m), "--tuned", str(m), "--rank", "2", "--out", str(out),
                                  "--force"],
    "inspect": lambda a, m, out: ["inspect", str(a), "--base", str(m), "--mitigate-intruders", "0.5", "--out", str(out),
                                  "--overwrite"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_force_replaces_only_a_file_sdlora_wrote(command, adapter, tiny_model, tmp_path, capsys):
    out = someone_elses_file(tmp_path / "model.safetensors")
    before = out.read_bytes()
    capsys.readouterr()
    assert cli_main(COMMANDS[command](adapter, tiny_model, out)) == 2
    err = capsys.readouterr().err.strip()
    assert str(out) in err and "sdlora did not write" in err and len(err.splitlines()) == 1, err
    assert out.read_bytes() == before
    notes = tmp_path / "notes.txt"  # nor any other file
    notes.write_text("mine")
    assert cli_main(COMMANDS[command](adapter, tiny_model, notes)) == 2
    assert notes.read_text() == "mine"


def test_force_replaces_a_file_sdlora_wrote(adapter, tmp_path):
    out = tmp_path / "lora.safetensors"
    for _ in range(2):
        assert cli_main(["export", str(adapter), "--format", "kohya", "--out", str(out), "--force"]) == 0
    assert cli_main(["resize", str(out), "--rank", "2", "--out", str(out.with_name("r.safetensors"))]) == 0
    assert cli_main(["resize", str(out), "--rank", "1", "--out", str(out.with_name("r.safetensors")), "--force"]) == 0


def test_a_merged_folder_replaces_only_a_folder_sdlora_merged(adapter, tiny_model, tmp_path, capsys):
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    (pictures / "holiday.png").write_bytes(b"precious")
    command = ["export", str(adapter), "--format", "merged-diffusers", "--base", str(tiny_model), "--force", "--out"]
    capsys.readouterr()
    assert cli_main(command + [str(pictures)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(pictures) in err and len(err.splitlines()) == 1
    assert (pictures / "holiday.png").read_bytes() == b"precious"
    merged = tmp_path / "merged"
    assert cli_main(command + [str(merged)]) == 0
    assert cli_main(command + [str(merged)]) == 0  # its own earlier output: replaced


def test_inspect_out_never_replaces_a_users_files(adapter, tmp_path, capsys):
    folder = tmp_path / "plots"
    folder.mkdir()
    (folder / "dw_norm.png").write_bytes(b"my own chart")
    capsys.readouterr()
    assert cli_main(["inspect", str(adapter), "--out", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(folder) in err and len(err.splitlines()) == 1, err
    assert (folder / "dw_norm.png").read_bytes() == b"my own chart" and not (folder / "inspect.json").exists()
    report = tmp_path / "report"
    assert cli_main(["inspect", str(adapter), "--out", str(report)]) == 0
    assert cli_main(["inspect", str(adapter), "--out", str(report)]) == 0  # its own report: replaced


@pytest.mark.parametrize("command", [["demo", "--steps", "1", "--out"], ["make-tiny-model"]])
def test_demo_and_tiny_model_never_write_into_a_folder_of_someone_elses(command, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    for name in ("data", "unet"):
        (folder / name).mkdir()
        (folder / name / "000.png").write_bytes(b"mine")
    (folder / "model_index.json").write_text("{}")
    before = files_under(folder)
    capsys.readouterr()
    assert cli_main(command + [str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(folder) in err and len(err.splitlines()) == 1, err
    assert files_under(folder) == before


def test_a_demo_folder_the_demo_wrote_is_its_own_to_rewrite(tmp_path):
    import yaml

    from sdlora.commands.demo import demo_recipe, is_demo_folder
    from sdlora.util.ownership import require_own_or_empty_folder

    folder = (tmp_path / "demo").resolve()
    folder.mkdir()
    (folder / "samples.png").write_bytes(b"an earlier demo's")
    (folder / "demo.yaml").write_text(yaml.safe_dump(demo_recipe(folder, 150), sort_keys=False))
    assert is_demo_folder(folder)
    require_own_or_empty_folder(folder, "demo --out", is_demo_folder)  # no refusal
    (folder / "demo.yaml").write_text(yaml.safe_dump(demo_recipe(tmp_path / "elsewhere", 150), sort_keys=False))
    assert not is_demo_folder(folder)


def test_a_run_whose_config_yaml_cannot_be_written_is_marked_failed_and_its_folder_reused(make_config, tmp_path,
                                                                                          monkeypatch):
    """run.json is written first (it makes the folder an sdlora run's); a config.yaml that then fails to write marks
    the run failed, so the same command reuses the folder once there is room, without --overwrite."""
    from test_write_errors import fill_disk_at

    out = tmp_path / "run"
    cfg = make_config(output={"dir": str(out)}, train={"max_steps": 1})
    fill_disk_at(monkeypatch, lambda path: path.name == "config.yaml")
    with pytest.raises(UserError, match="config.yaml"):
        train(cfg, log=quiet)
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    monkeypatch.undo()
    train(cfg, log=quiet)
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
