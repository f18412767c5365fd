"""Finding (image, caption, repeats) items in the dataset sources a config names.

Three layouts, told apart by what the subset's folder holds:
- `metadata.jsonl` (the Hugging Face imagefolder layout): one JSON object a line with `file_name`
  (relative to the folder) and `text` (the caption). Only listed files are used.
- kohya-style: subfolders named `<repeats>_<name>`; each image's repeats come from the prefix, and
  `<name>` is the caption of an image without a caption file (unless the subset sets class_caption).
- a plain folder: images with a same-name caption file (`.txt`, or the subset's caption_extension).

Problems found here (a missing/empty/non-UTF-8 caption, two images sharing one name) are returned as
(path, reason) pairs, not raised: the caller applies data.on_error.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..config import SubsetConfig
from ..errors import UserError
from .images import is_image_file

KOHYA_DIR = re.compile(r"^(\d+)_(.+)$")
METADATA = "metadata.jsonl"


@dataclass(frozen=True)
class Item:
    """One training image before it is opened; `subset` indexes the config's subset list."""

    path: Path
    caption: str
    repeats: int
    loss_weight: float
    subset: int


@dataclass(frozen=True)
class Problem:
    reason: str


@dataclass(frozen=True)
class Rejected:
    """A file found in a source but refused before it is opened (caption or naming problem)."""

    path: Path
    reason: str


def discover(subsets: list[SubsetConfig], prior_loss_weight: float) -> list[Item | Rejected]:
    """Every image of every subset, in a fixed order (subset, folder, name), as an Item or a Rejected."""
    entries: list[Item | Rejected] = []
    for index, subset in enumerate(subsets):
        root = Path(subset.path)
        if not root.is_dir():
            raise UserError(f"data subset {index}: no such folder: {root}")
        weight = prior_loss_weight if subset.is_regularization else 1.0
        if (root / METADATA).is_file():
            found = from_metadata(root, subset)
        elif kohya_dirs(root):
            found = [(p, cap, reps) for d, reps, name in kohya_dirs(root)
                     for p, cap, _ in from_folder(d, subset, default_caption=name, repeats=reps)]
        else:
            found = from_folder(root, subset, default_caption=None, repeats=subset.repeats)
        for path, caption, repeats in found:
            if isinstance(caption, Problem):
                entries.append(Rejected(path, caption.reason))
            else:
                entries.append(Item(path, caption, repeats, weight, index))
    return entries


def kohya_dirs(root: Path) -> list[tuple[Path, int, str]]:
    found = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        m = KOHYA_DIR.match(d.name)
        if m and int(m.group(1)) > 0:
            found.append((d, int(m.group(1)), m.group(2).replace("_", " ")))
    return found


def from_folder(folder: Path, subset: SubsetConfig, *, default_caption: str | None, repeats: int):
    """(image, caption or Problem, repeats) for every image directly in `folder`, sorted by name."""
    images = sorted(p for p in folder.iterdir() if is_image_file(p))
    by_stem: dict[str, list[Path]] = {}
    for p in images:
        by_stem.setdefault(p.stem, []).append(p)
    fallback = subset.class_caption if subset.class_caption is not None else default_caption
    out = []
    for p in images:
        twins = by_stem[p.stem]
        if len(twins) > 1:
            names = ", ".join(t.name for t in twins)
            out.append((p, Problem(f"duplicate name: {names} would share one caption"), repeats))
            continue
        out.append((p, read_caption(p, subset.caption_extension, fallback), repeats))
    return out


def read_caption(image: Path, extension: str, fallback: str | None):
    """The caption file's text; the fallback when it is missing or empty; else a Problem."""
    ext = extension if extension.startswith(".") else "." + extension
    cap = image.with_suffix(ext)
    if not cap.is_file():
        return fallback if fallback is not None else Problem(f"no caption file ({cap.name}) and no class_caption")
    try:
        text = cap.read_bytes().decode("utf-8-sig").strip()
    except UnicodeDecodeError as e:
        return Problem(f"caption {cap.name} is not UTF-8 (byte {e.start})")
    except OSError as e:
        return Problem(f"caption {cap.name} is unreadable ({e.strerror})")
    if not text:
        return fallback if fallback is not None else Problem(f"caption {cap.name} is empty and no class_caption")
    return " ".join(text.split())  # captions are one line; newlines inside a .txt are just spaces


def from_metadata(root: Path, subset: SubsetConfig):
    out, seen = [], set()
    lines = (root / METADATA).read_bytes().splitlines()
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        where = root / f"{METADATA}:{n}"
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            out.append((where, Problem("not a UTF-8 JSON object"), subset.repeats))
            continue
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            out.append((where, Problem("no file_name"), subset.repeats))
            continue
        path = root / row["file_name"]
        if path in seen:
            out.append((path, Problem(f"listed twice in {METADATA} (line {n})"), subset.repeats))
            continue
        seen.add(path)
        if not path.is_file():
            out.append((path, Problem(f"listed in {METADATA} line {n} but missing"), subset.repeats))
            continue
        text = row.get("text")
        text = " ".join(text.split()) if isinstance(text, str) else ""
        if not text:
            text = subset.class_caption if subset.class_caption is not None else Problem(
                f"empty or missing text in {METADATA} line {n} and no class_caption")
        out.append((path, text, subset.repeats))
    return out
