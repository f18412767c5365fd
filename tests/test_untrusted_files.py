"""A file someone else made is data: nothing in it may unpickle, choose a path to open, or turn on an option
(issue 25, section 1)."""

import json

import pytest
import torch

import sdlora.training.checkpoint as ckpt
from sdlora.cli import main as cli_main
from sdlora.errors import UserError
from sdlora.training.loop import train


def quiet(*a, **k):
    pass


class _Planted:
    """Unpickling this writes a file: the proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (_touch, (self.marker,))


def _touch(path):
    with open(path, "w") as f:
        f.write("ran")
    return {}


def _refresh_manifest(folder, step):
    ckpt.write_manifest(folder, step)  # a shared folder's manifest is consistent: the attacker wrote it too
    assert ckpt.verify_checkpoint(folder) is None


@pytest.fixture
def two_step_run(make_config, tmp_path):
    out = tmp_path / "run"
    cfg = make_config({"output": {"dir": str(out)}, "train": {"max_steps": 2, "batch_size": 2},
                       "checkpoint": {"every_steps": 2, "keep_last": 2}})
    train(cfg, log=quiet)
    return cfg, out, out / "checkpoints" / "step_000002"


@pytest.mark.parametrize("name", ["rng_rank0.pt", "optimizer.pt"])
def test_resume_never_unpickles_code_from_a_shared_checkpoint(two_step_run, tmp_path, name):
    cfg, out, folder = two_step_run
    marker = tmp_path / "code_ran"
    torch.save({"state": _Planted(marker)}, folder / name)  # a valid torch file whose pickle calls _touch
    _refresh_manifest(folder, 2)
    with pytest.raises(UserError, match=name.replace(".", r"\.")) as info:
        train(cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 4})}),
              resume=str(folder), log=quiet)
    assert "\n" not in str(info.value)
    assert not marker.exists()  # nothing in the file ran


def test_a_checkpoint_written_by_the_previous_version_still_resumes(two_step_run):
    """sdlora <= this fix saved the RNG state with torch.save (tensors, tuples, ints, a str): it loads without
    unpickling code (weights_only), so old run folders keep resuming."""
    _, _, folder = two_step_run
    state = torch.load(folder / "rng_rank0.pt", weights_only=True)
    assert set(state) >= {"torch", "python", "numpy"}


def test_a_manifest_never_makes_resume_read_a_file_outside_its_checkpoint(two_step_run, tmp_path):
    _, out, folder = two_step_run
    secret = tmp_path / "secret.txt"
    secret.write_text("the user's own file\n")
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in (str(secret), "../../../secret.txt"):
        manifest["files"][name] = {"bytes": 0, "sha256": "0" * 64}
        (folder / "manifest.json").write_text(json.dumps(manifest))
        problem = ckpt.verify_checkpoint(folder)
        assert problem is not None and "bytes" not in problem and "SHA-256" not in problem, problem
        del manifest["files"][name]
