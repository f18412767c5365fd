"""A write that fails (full disk) on a path the user gave is one line naming the path, exit 2, and loses nothing.

The disk fills where it usually shows: when the written bytes reach the file system (`atomic._flush_to_disk`,
made to raise ENOSPC for chosen file names), or inside diffusers' own `save_pretrained` for a merged folder.
"""

import errno
import shlex

import pytest
import torch
from safetensors.torch import load_file

from sdlora.util import atomic
from sdlora.training.checkpoint import verify_checkpoint
from sdlora.cli import main
from sdlora.config import dump_yaml
from sdlora.commands.export import run_export
from sdlora.errors import UserError
from sdlora.training.loop import train


def fill_disk_at(monkeypatch, when=lambda path: True):
    """Every atomic write of a file for which `when(path)` holds hits a full disk."""
    real = atomic._flush_to_disk

    def flush(f, path):
        if when(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, path)

    monkeypatch.setattr(atomic, "_flush_to_disk", flush)


def error_line(capsys) -> str:
    err = capsys.readouterr().err  # besides the progress bar: one error line, no traceback
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def no_temp_files(folder):
    return not [p for p in folder.rglob(".*.tmp")]


def test_a_full_disk_at_the_final_adapter_names_the_intact_checkpoint_and_the_command_that_writes_it(
        make_config, tmp_path, monkeypatch, capsys):
    cfg = make_config(train={"max_steps": 2})
    config = tmp_path / "run.yaml"
    config.write_text(dump_yaml(cfg))
    out = tmp_path / "run"
    adapter = out / "adapter.safetensors"
    fill_disk_at(monkeypatch, lambda path: path == adapter)  # not the checkpoint's copy of the same name
    assert main(["train", "--config", str(config)]) == 2
    err = error_line(capsys)
    checkpoint = out / "checkpoints" / "step_000002"
    assert str(adapter) in err and "disk is full" in err and str(checkpoint) in err, err
    assert verify_checkpoint(checkpoint) is None and not adapter.exists() and no_temp_files(out)
    assert '"failed"' in (out / "run.json").read_text()

    monkeypatch.undo()  # room again: the command the message gives writes the adapter
    command = shlex.split(err.split("write the adapter with: ")[1])
    assert command[:2] == ["sdlora", "export"] and main(command[1:]) == 0
    written, kept = load_file(adapter), load_file(checkpoint / "adapter.safetensors")
    assert written.keys() == kept.keys() and all(torch.equal(written[k], kept[k]) for k in kept)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "merged-single-file", "merged-diffusers"])
def test_a_full_disk_during_export_is_one_line_naming_the_file_and_keeps_the_old_one(fmt, make_config, tmp_path,
                                                                                      tiny_model, monkeypatch, capsys):
    train(make_config(train={"max_steps": 1}), log=lambda *_: None)
    out = tmp_path / ("merged" if fmt == "merged-diffusers" else "out.safetensors")
    base = ["--base", str(tiny_model)] if fmt.startswith("merged") else []
    run_export(tmp_path / "run", fmt, out, base=str(tiny_model), report=lambda *_: None)
    before = sorted((p.relative_to(out), p.read_bytes()) for p in out.rglob("*") if p.is_file()) if out.is_dir() \
        else out.read_bytes()
    fill_disk_at(monkeypatch)
    if fmt == "merged-diffusers":  # diffusers writes the model files itself
        import safetensors.torch

        def full(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert main(["export", str(tmp_path / "run"), "--format", fmt, "--out", str(out), "--force", *base]) == 2
    err = error_line(capsys)
    assert f"could not write {out}: the disk is full" in err, err
    after = sorted((p.relative_to(out), p.read_bytes()) for p in out.rglob("*") if p.is_file()) if out.is_dir() \
        else out.read_bytes()
    assert after == before and no_temp_files(tmp_path) and not list(tmp_path.glob(".merged.*"))


@pytest.mark.parametrize("name, extra", [
    ("run.json", {}),
    ("config.yaml", {}),
    ("metrics.jsonl", {}),
    ("grid.png", {"sample": {"prompts": ["a red circle"], "every_steps": 1, "num_inference_steps": 2}}),
])
def test_a_full_disk_at_any_training_write_is_one_line_naming_the_file(name, extra, make_config, tmp_path,
                                                                      monkeypatch):
    cfg = make_config(extra, train={"max_steps": 1})
    fill_disk_at(monkeypatch, lambda path: path.name == name)
    with pytest.raises(UserError, match=rf"could not write \S*{name.replace('.', '[.]')}: the disk is full"):
        train(cfg, log=lambda *_: None)
    assert no_temp_files(tmp_path)


def test_a_full_disk_at_inspect_out_and_mitigate_out_is_one_line_naming_the_file(make_config, tiny_model, tmp_path,
                                                                                 monkeypatch, capsys):
    result = train(make_config(train={"max_steps": 1}), log=lambda *_: None)
    fill_disk_at(monkeypatch)
    assert main(["inspect", str(result.adapter_path), "--out", str(tmp_path / "report")]) == 2
    assert f"could not write {tmp_path / 'report' / 'inspect.json'}" in error_line(capsys)
    target = tmp_path / "mitigated.safetensors"
    assert main(["inspect", str(result.adapter_path), "--base", str(tiny_model), "--mitigate-intruders", "0.5",
                 "--out", str(target)]) == 2
    assert f"could not write {target}" in error_line(capsys)
    assert not target.exists() and no_temp_files(tmp_path)
