"""Files and folders sdlora writes get the mode a plain open() / mkdir gives them (0666 / 0777 less the umask), so
another user's A1111 or ComfyUI can read an adapter wherever the umask allows it (mkstemp's 0600 did not)."""

import os
import stat

import pytest
import torch

from sdlora.adapter.merge import build_folder_atomically
from sdlora.util import atomic


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], ids=["022", "077", "002"])
def test_written_files_and_merged_folders_get_the_mode_a_plain_open_gives(tmp_path, umask):
    old = os.umask(umask)  # process-wide: restored before anything else runs
    try:
        with open(tmp_path / "plain", "wb"):
            pass
        os.mkdir(tmp_path / "plain_dir")
        atomic.write_json(tmp_path / "run.json", {"status": "finished"})
        atomic.save_safetensors(tmp_path / "adapter.safetensors", {"w": torch.ones(2)})
        atomic.write_text(tmp_path / "run.json", "{}\n")  # a rewrite of an existing file too
        with build_folder_atomically(tmp_path / "merged") as tmp:
            (tmp / "model_index.json").write_text("{}")
    finally:
        os.umask(old)
    assert mode(tmp_path / "plain") == 0o666 & ~umask and mode(tmp_path / "plain_dir") == 0o777 & ~umask
    for name in ("run.json", "adapter.safetensors"):
        assert mode(tmp_path / name) == mode(tmp_path / "plain"), name
    assert mode(tmp_path / "merged") == mode(tmp_path / "plain_dir")
    assert not list(tmp_path.glob(".*.tmp"))
