"""Atomic file writes: a temp file in the same folder, flushed and fsynced, then renamed over the target.

A crash or a kill at any point leaves either the old file or the new one, never a torn file. The temp file (and a
merged model's temp folder) is created with mode 0666 (0777) and the process umask, as a plain `open()` (`mkdir`)
creates one, so other users' tools (A1111, ComfyUI) read what sdlora writes wherever the umask lets them; mkstemp's
and mkdtemp's 0600 / 0700 would hide every file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import IO, Iterator

from sdlora.errors import WriteError


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temp file beside `path`; on a clean exit fsync it and rename it to `path`.

    Any OSError on the way (full disk, read-only folder) leaves `path` as it was and is raised as a `WriteError`:
    one line naming `path` (a UserError), still an OSError with its errno.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temp_file(path)
    except WriteError:
        raise
    except OSError as e:
        raise WriteError(path, e) from e
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            _flush_to_disk(f, path)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(path, e) from e
        raise
    _fsync_dir(path.parent)


_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)


def _temp_names(path: Path, attempts: int = 100) -> Iterator[Path]:
    """Hidden, unpredictable names beside `path` (`.NAME.<hex>.tmp`), as tempfile's; FileExistsError when all are taken."""
    for _ in range(attempts):
        yield path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    raise FileExistsError(f"no free temporary name beside {path}")


def _create_beside(path: Path, create):
    """`create(tmp)` on the first free temp name beside `path` (it raises FileExistsError on a taken one)."""
    for tmp in _temp_names(path):  # raises FileExistsError itself once every attempt is taken
        with contextlib.suppress(FileExistsError):
            return create(tmp)


def _create_temp_file(path: Path) -> tuple[int, Path]:
    """A new, empty temp file beside `path` (O_EXCL: never someone else's), mode 0666 less the umask, as open() makes."""
    return _create_beside(path, lambda tmp: (os.open(tmp, _TEMP_FLAGS, 0o666), tmp))  # the kernel applies the umask


def make_temp_dir(path: str | os.PathLike) -> Path:
    """A new, empty temp folder beside `path`, mode 0777 less the umask, as mkdir makes; for writers that build a
    whole folder and rename it into place (adapter/merge.build_folder_atomically). OSError as os.mkdir raises it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _create_beside(path, lambda tmp: (os.mkdir(tmp, 0o777), tmp)[1])


def _flush_to_disk(f: IO, path: Path) -> None:
    """Where a full disk usually shows (buffered bytes reach the file system); `path` is the file's final name."""
    f.flush()
    os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """safetensors.torch.save_file, atomically (serialised in memory, then written via a temp file). Every
    trained tensor reaches disk through here: non-finite values are refused (NonFiniteWeights), never written."""
    from safetensors.torch import save

    from sdlora.util.finite import require_finite

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    require_finite(tensors, path)
    write_bytes(path, save(tensors, metadata=metadata))


def save_torch(path: str | os.PathLike, obj) -> None:
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks (checkpoint manifests, latent-cache keys)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
