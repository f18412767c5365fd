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
