"""Input that is found but not used as the user probably meant is reported at start-up, never silently
dropped or misread (issue 14, item 5): caption files with another extension, caption encodings, image types
sdlora does not read, caption files without an image, folders a layout does not read, empty captions."""

import json

import numpy as np
import pytest
from PIL import Image

from sdlora.config import validate
from sdlora.data import build_training_data
from sdlora.data.pipeline import note_lines
from sdlora.data.sources import Item, Rejected, discover
from sdlora.model.loading import load_components


def png(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


def cfg(tiny_model, tmp_path, folder, **data):
    return validate({"model": {"path": str(tiny_model)}, "output": {"dir": str(tmp_path / "run")},
                     "data": {"path": str(folder), "resolution": 64, **data}, "train": {"max_steps": 2},
                     "log": {"tracker": "none"}})


def scanned(folder, **data):
    """(items by file name, rejected reasons by file name, note lines) from discovery alone."""
    notes = []
    subsets = validate({"model": {"path": "m"}, "output": {"dir": "o"}, "data": {"path": str(folder), **data}}).data_subsets()
    entries = discover(subsets, 1.0, notes)
    items = {e.path.name: e.caption for e in entries if isinstance(e, Item)}
    rejected = {e.path.name: e.reason for e in entries if isinstance(e, Rejected)}
    return items, rejected, note_lines(notes)


@pytest.fixture(scope="module")
def comps(tiny_model):
    return load_components(str(tiny_model))


# ---------------------------------------------------------------------- caption files with another extension
def kohya_tree_with_caption_files(root):
    for i, name in enumerate(["a", "b", "c", "d"]):
        png(root / "10_sks dog" / f"{name}.png", seed=i)
        (root / "10_sks dog" / f"{name}.caption").write_text(f"sks dog number {i}")
    return root


def test_kohya_caption_files_with_another_extension_are_reported_at_start(tmp_path, tiny_model, comps):
    root = kohya_tree_with_caption_files(tmp_path / "kohya")
    lines = []
    data = build_training_data(cfg(tiny_model, tmp_path, root), comps, say=lines.append)
    assert {s.item.caption for s in data.samples} == {"sks dog"}  # kohya's rule: the folder name
    note = [line for line in lines if "no .txt caption but a .caption file beside it" in line]
    assert len(note) == 1 and note[0].startswith("sdlora: note: 4 x ") and "a.png" in note[0] and ", ..." in note[0], lines
    # with the extension set, the captions are used and nothing is reported
    items, _, notes = scanned(root, caption_extension=".caption")
    assert items["a.png"] == "sks dog number 0" and notes == []


def test_a_flat_folder_names_the_caption_file_it_found_with_another_extension(tmp_path):
    png(tmp_path / "flat" / "a.png")
    (tmp_path / "flat" / "a.caption").write_text("a dog")
    _, rejected, _ = scanned(tmp_path / "flat")
    assert "no caption file (a.txt)" in rejected["a.png"] and "a.caption exists: set caption_extension: .caption" in rejected["a.png"]


# --------------------------------------------------------------------------------------- caption encodings
TEXT = "a photo of caf\u00e9, \u65e5\u672c"
ENCODED = {
    "utf8.png": TEXT.encode("utf-8"),
    "utf8_bom.png": TEXT.encode("utf-8-sig"),
    "utf16_le_bom.png": TEXT.encode("utf-16"),  # Python writes the little-endian mark
    "utf16_be_bom.png": b"\xfe\xff" + TEXT.encode("utf-16-be"),
    "utf32_bom.png": TEXT.encode("utf-32"),
}
REFUSED = {
    "utf16_no_bom.png": (TEXT.encode("utf-16-le"), "holds NUL characters (UTF-16 saved without a byte-order mark?)"),
    "utf16_ascii_no_bom.png": (b"a dog".decode().encode("utf-16-le"), "holds NUL characters"),  # decodes as UTF-8
    "latin1.png": ("caf\u00e9".encode("latin-1"), "is not UTF-8 (byte 3)"),
    "control.png": (b"a dog\x1b[0m", "holds control character U+001B"),
}


def test_captions_in_utf8_or_with_a_byte_order_mark_read_as_written_and_others_are_refused(tmp_path):
    folder = tmp_path / "enc"
    for i, (name, raw) in enumerate({**ENCODED, **{n: r for n, (r, _) in REFUSED.items()}}.items()):
        png(folder / name, seed=i)
        (folder / name).with_suffix(".txt").write_bytes(raw)
    items, rejected, _ = scanned(folder)
    assert items == {name: TEXT for name in ENCODED}
    assert set(rejected) == set(REFUSED)
    for name, (_, reason) in REFUSED.items():
        assert reason in rejected[name], (name, rejected[name])


def test_metadata_jsonl_with_a_byte_order_mark_reads(tmp_path):
    folder = tmp_path / "meta"
    png(folder / "a.png")
    (folder / "metadata.jsonl").write_bytes(json.dumps({"file_name": "a.png", "text": "a dog"}).encode("utf-8-sig"))
    items, rejected, _ = scanned(folder)
    assert items == {"a.png": "a dog"} and rejected == {}


# ------------------------------------------------------------------------------ files and folders not read
def test_files_and_folders_that_are_not_read_are_reported(tmp_path):
    flat = tmp_path / "flat"
    png(flat / "a.png")
    (flat / "a.txt").write_text("a dog")
    (flat / "photo.heic").write_bytes(b"\0" * 16)
    (flat / "lost.txt").write_text("a caption whose image is gone")
    png(flat / "more" / "b.png")
    items, _, notes = scanned(flat)
    assert list(items) == ["a.png"]
    text = "\n".join(notes)
    assert "1 x image type .heic is not read" in text and "photo.heic" in text
    assert "1 x .txt caption file with no image of the same name" in text and "lost.txt" in text
    assert "1 x subfolder with images not read" in text and "more" in text

    kohya = tmp_path / "kohya"
    png(kohya / "5_cat" / "c.png")
    (kohya / "5_cat" / "c.txt").write_text("")
    png(kohya / "stray.png")
    png(kohya / "cat" / "d.png")
    png(kohya / "0_cat" / "e.png")
    items, _, notes = scanned(kohya)
    assert items == {"c.png": "cat"}
    text = "\n".join(notes)
    for reason, name in [("caption file is empty: trained on the folder name", "c.txt"),
                         ("image in the root of a kohya folder tree, not read", "stray.png"),
                         ("folder in a kohya tree not named <repeats>_<name>, not read", "cat"),
                         ("kohya folder with 0 repeats, not read", "0_cat")]:
        assert reason in text and name in text, (reason, notes)

    meta = tmp_path / "meta"
    png(meta / "a.png")
    png(meta / "unlisted.png")
    (meta / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a dog"}) + "\n")
    _, _, notes = scanned(meta)
    assert any("image not listed in metadata.jsonl, not read" in n and "unlisted.png" in n for n in notes), notes
