"""What sdlora wrote, and so may replace: every `--force` / `--overwrite` goes through `require_replaceable`.

sdlora never deletes or replaces a file it did not write. It recognises its own outputs by what it writes into
them: a `.safetensors` file with `sdlora.*` metadata (every adapter, kohya file and merged single file it writes
carries `sdlora.format` or the run record `sdlora.run`), a merged diffusers folder holding `sdlora_export.json` (or,
from earlier versions, `sdlora_run.json`), an inspect folder's `inspect.json` with `"written_by": "sdlora inspect"`,
a demo folder's `demo.yaml`. Run folders are recognised by their `run.json` (`training/run_folder.py`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sdlora.errors import UserError

MERGED_MARKER = "sdlora_export.json"  # written into every merged diffusers folder
INSPECT_MARK = {"written_by": "sdlora inspect"}  # in every inspect.json


def _safetensors_metadata(path: Path) -> dict | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 - any file safetensors cannot read is not one sdlora wrote
        return None


def written_by_sdlora(path: str | os.PathLike) -> bool:
    """True for an output sdlora wrote (see the module docstring); False for anything else, links included."""
    path = Path(path)
    if path.is_symlink():
        return False
    if path.is_file():
        if path.suffix == ".safetensors":
            meta = _safetensors_metadata(path)
            return meta is not None and any(k.startswith("sdlora.") for k in meta)
        return False
    if path.is_dir():
        return (path / MERGED_MARKER).is_file() or (path / "sdlora_run.json").is_file()  # run_record.FOLDER_FILE
    return False


def require_replaceable(path: str | os.PathLike, command: str) -> None:
    """Refuse (one line, exit 2) to replace an existing `path` that sdlora did not write."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not written_by_sdlora(path):
        raise UserError(f"{command}: {path} exists and sdlora did not write it; sdlora replaces only its own outputs "
                        "(choose another --out, or move it away)")


def inspect_folder_is_replaceable(folder: Path, names: tuple[str, ...]) -> None:
    """`inspect --out FOLDER` writes `names` into FOLDER: refused where one exists and FOLDER's inspect.json (if any)
    is not one sdlora wrote."""
    taken = [n for n in names if (folder / n).exists() or (folder / n).is_symlink()]
    if not taken:
        return
    try:
        ours = json.loads((folder / "inspect.json").read_text(encoding="utf-8")).get("written_by") == \
            INSPECT_MARK["written_by"]
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise UserError(f"inspect --out: {folder} holds {taken[0]}, which sdlora did not write; sdlora replaces only "
                        "its own outputs (choose another --out folder)")


def require_own_or_empty_folder(folder: Path, command: str, is_ours) -> None:
    """A command that writes many files into `folder`: only into a new or empty folder, or one `is_ours(folder)`."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise UserError(f"{command}: {folder} is not a folder sdlora made; give a new folder")
    if folder.is_dir() and any(folder.iterdir()) and not is_ours(folder):
        raise UserError(f"{command}: {folder} is not empty and sdlora did not make it; give a new or empty folder")
