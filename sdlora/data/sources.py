"""Finding (image, caption, repeats) items in the dataset sources a config names.

Three layouts, told apart by what the subset's folder holds:
- `metadata.jsonl` (the Hugging Face imagefolder layout): one JSON object a line with `file_name`
  (relative to the folder) and `text` (the caption). Only listed files are used.
- kohya-style: subfolders named `<repeats>_<name>`; each image's repeats come from the prefix, and
  `<name>` is the caption of an image without a caption file (unless the subset sets class_caption).
- a plain folder: images with a same-name caption file (`.txt`, or the subset's caption_extension).

Problems found here (a missing/empty/undecodable caption, two images sharing one name) are returned as
(path, reason) pairs, not raised: the caller applies data.on_error. What is found and used otherwise than
the user probably meant, or not used at all (a caption file with another extension, an image type sdlora
does not read, a caption file with no image, a folder a layout does not read, an empty caption replaced by
the class caption) is collected as a `Note`, which the caller reports at start-up with counts and examples.

Caption files are UTF-8 (with or without a byte-order mark) or UTF-16/32 with a byte-order mark; text that
holds NUL or other control characters (UTF-16 saved without a mark reads as text full of NULs) is refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # type only: the config imports the data package
    from sdlora.config import SubsetConfig

from sdlora.data.images import IMAGE_EXTS, is_image_file
from sdlora.errors import UserError

KOHYA_DIR = re.compile(r"^(\d+)_(.+)$")
METADATA = "metadata.jsonl"
CAPTION_EXTS = (".txt", ".caption", ".cap")  # what other trainers name caption files
# Image types people keep beside their training images that PIL (as installed) does not read or sdlora refuses.
OTHER_IMAGE_EXTS = (".heic", ".heif", ".avif", ".jxl", ".jfif", ".jpe", ".psd", ".svg", ".ico", ".jp2", ".tga",
                    ".exr", ".hdr", ".dng", ".cr2", ".nef", ".arw", ".raw", ".ppm", ".pgm", ".pbm", ".pnm")
BOMS = ((b"\x00\x00\xfe\xff", "utf-32-be"), (b"\xff\xfe\x00\x00", "utf-32-le"), (b"\xef\xbb\xbf", "utf-8-sig"),
        (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))
CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")  # tab, newlines, \v and \f are whitespace, kept (then collapsed)


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
class Note:
    """A file or folder found but not used as the user probably meant; `reason` is shared by all of its kind."""

    path: Path
    reason: str


@dataclass(frozen=True)
class Rejected:
    """A file found in a source but refused before it is opened (caption or naming problem)."""

    path: Path
    reason: str


def discover(subsets: list[SubsetConfig], prior_loss_weight: float,
             notes: list[Note] | None = None) -> list[Item | Rejected]:
    """Every image of every subset, in a fixed order (subset, folder, name), as an Item or a Rejected;
    what is found but not used as meant is appended to `notes`."""
    entries: list[Item | Rejected] = []
    notes = notes if notes is not None else []
    for index, subset in enumerate(subsets):
        root = Path(subset.path)
        if not root.is_dir():
            raise UserError(f"data subset {index}: no such folder: {root}")
        weight = prior_loss_weight if subset.is_regularization else 1.0
        if (root / METADATA).is_file():
            found = from_metadata(root, subset, notes)
        elif kohya_dirs(root):
            found = [(p, cap, reps) for d, reps, name in kohya_dirs(root)
                     for p, cap, _ in from_folder(d, subset, default_caption=name, repeats=reps, notes=notes)]
            note_unread_kohya_parts(root, notes)
        else:
            found = from_folder(root, subset, default_caption=None, repeats=subset.repeats, notes=notes)
            for d in sorted(p for p in root.iterdir() if p.is_dir()):
                if any(is_image_file(f) for f in d.iterdir()):
                    notes.append(Note(d, "subfolder with images not read (a plain folder is read alone; name "
                                         "subfolders <repeats>_<name> for the kohya layout)"))
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


def note_unread_kohya_parts(root: Path, notes: list[Note]) -> None:
    """In a kohya tree only <repeats>_<name> subfolders with repeats > 0 are read: say what else holds images."""
    for p in sorted(root.iterdir()):
        if is_image_file(p):
            notes.append(Note(p, "image in the root of a kohya folder tree, not read (only <repeats>_<name> "
                                 "subfolders are)"))
        elif p.is_dir() and any(is_image_file(f) for f in p.iterdir()):
            m = KOHYA_DIR.match(p.name)
            if m is None:
                notes.append(Note(p, "folder in a kohya tree not named <repeats>_<name>, not read"))
            elif int(m.group(1)) == 0:
                notes.append(Note(p, "kohya folder with 0 repeats, not read"))


def note_unused_files(folder: Path, images: list[Path], caption_ext: str, notes: list[Note]) -> None:
    """Image types sdlora does not read, and caption files with no image beside them."""
    stems = {p.stem for p in images}
    for p in sorted(folder.iterdir()):
        if not p.is_file():
            continue
        suffix = p.suffix.lower()
        if suffix in OTHER_IMAGE_EXTS:
            notes.append(Note(p, f"image type {suffix} is not read (allowed: {', '.join(IMAGE_EXTS)})"))
        elif suffix == caption_ext.lower() and p.stem not in stems:
            notes.append(Note(p, f"{caption_ext} caption file with no image of the same name"))


def other_caption_file(image: Path, ext: str) -> Path | None:
    """A caption file beside `image` with another usual caption extension than the configured one."""
    for other in CAPTION_EXTS:
        if other != ext.lower() and image.with_suffix(other).is_file():
            return image.with_suffix(other)
    return None


def from_folder(folder: Path, subset: SubsetConfig, *, default_caption: str | None, repeats: int,
                notes: list[Note] | None = None):
    """(image, caption or Problem, repeats) for every image directly in `folder`, sorted by name."""
    notes = notes if notes is not None else []
    ext = caption_ext(subset.caption_extension)
    images = sorted(p for p in folder.iterdir() if is_image_file(p))
    note_unused_files(folder, images, ext, notes)
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
        out.append((p, read_caption(p, ext, fallback, notes, subset.multiline_captions), repeats))
    return out


def caption_ext(extension: str) -> str:
    return extension if extension.startswith(".") else "." + extension


def decode_text(raw: bytes, name: str):
    """Text of a caption (or metadata) file, or a Problem saying why it cannot be trusted."""
    for bom, codec in BOMS:
        if raw.startswith(bom):
            try:
                text = raw.decode(codec)
                break
            except UnicodeDecodeError as e:
                return Problem(f"{name} has a {codec.upper()} byte-order mark but is not {codec.upper()} (byte {e.start})")
    else:
        if b"\x00" in raw:  # no UTF-8 text holds a NUL byte; UTF-16/32 without a mark does
            return Problem(f"{name} holds NUL characters (UTF-16 saved without a byte-order mark?); save it as UTF-8")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return Problem(f"{name} is not UTF-8 (byte {e.start}); save it as UTF-8")
    text = text.lstrip("\ufeff")
    bad = CONTROL.search(text)
    if bad:
        if bad.group() == "\x00":
            return Problem(f"{name} holds NUL characters (UTF-16 saved without a byte-order mark?); save it as UTF-8")
        return Problem(f"{name} holds control character U+{ord(bad.group()):04X} at position {bad.start()}; not text")
    return text


def one_line(text: str, lines: bool = False) -> str:
    """Whitespace collapsed; with `lines` (multiline_captions) each non-blank line kept as its own caption, "\n" apart."""
    if lines:
        return "\n".join(" ".join(line.split()) for line in text.splitlines() if line.strip())
    return " ".join(text.split())


def read_caption(image: Path, ext: str, fallback: str | None, notes: list[Note] | None = None, lines: bool = False):
    """The caption file's text (its lines kept apart with `lines`); the fallback when it is missing or empty (with a
    Note where that is probably not what was meant); else a Problem."""
    notes = notes if notes is not None else []
    ext = caption_ext(ext)
    cap = image.with_suffix(ext)
    if not cap.is_file():
        other = other_caption_file(image, ext)
        if fallback is None:
            hint = f"; {other.name} exists: set caption_extension: {other.suffix}" if other else ""
            return Problem(f"no caption file ({cap.name}) and no class_caption{hint}")
        if other is not None:
            notes.append(Note(image, f"no {ext} caption but a {other.suffix} file beside it (caption_extension is "
                                     f"{ext}): trained on the folder name / class_caption instead"))
        return fallback
    try:
        text = decode_text(cap.read_bytes(), f"caption {cap.name}")
    except OSError as e:
        return Problem(f"caption {cap.name} is unreadable ({e.strerror})")
    if isinstance(text, Problem):
        return text
    text = text.strip()
    if not text:
        if fallback is None:
            return Problem(f"caption {cap.name} is empty and no class_caption")
        notes.append(Note(cap, "caption file is empty: trained on the folder name / class_caption instead"))
        return fallback
    return one_line(text, lines)  # without multiline_captions, newlines inside a .txt are just spaces


def _inside(name: str) -> bool:
    """A relative path that stays in its folder (no drive or root, no `..`), as metadata.jsonl's file_name must be."""
    from pathlib import PurePosixPath, PureWindowsPath

    parts = PurePosixPath(name.replace("\\", "/")).parts
    return bool(name) and not PurePosixPath(name).is_absolute() and not PureWindowsPath(name).drive \
        and ".." not in parts and not name.startswith(("/", "\\", "~"))


def from_metadata(root: Path, subset: SubsetConfig, notes: list[Note] | None = None):
    notes = notes if notes is not None else []
    out, seen = [], set()
    text = decode_text((root / METADATA).read_bytes(), METADATA)
    if isinstance(text, Problem):
        return [(root / METADATA, text, subset.repeats)]
    for n, raw in enumerate(text.split("\n"), 1):
        if not raw.strip():
            continue
        where = root / f"{METADATA}:{n}"
        try:
            row = json.loads(raw)
        except json.JSONDecodeError:
            out.append((where, Problem("not a JSON object"), subset.repeats))
            continue
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            out.append((where, Problem("no file_name"), subset.repeats))
            continue
        if not _inside(row["file_name"]):  # a data set's file names only its own files, never a path elsewhere
            out.append((where, Problem(f"file_name {row['file_name']!r} is not a path inside {root}"), subset.repeats))
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
        text = one_line(text, subset.multiline_captions) if isinstance(text, str) else ""
        if not text:
            if subset.class_caption is None:
                text = Problem(f"empty or missing text in {METADATA} line {n} and no class_caption")
            else:
                notes.append(Note(path, f"empty or missing text in {METADATA}: trained on class_caption instead"))
                text = subset.class_caption
        out.append((path, text, subset.repeats))
    listed = {p.resolve() for p in seen}
    for p in sorted(root.iterdir()):
        if is_image_file(p) and p.resolve() not in listed:
            notes.append(Note(p, f"image not listed in {METADATA}, not read"))
    return out
