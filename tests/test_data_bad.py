"""Bad data: every kind has a defined outcome under data.on_error (skip lists it, fail stops before training)."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdlora.config import validate
from sdlora.data import build_training_data
from sdlora.data.images import BadImage, open_checked
from sdlora.errors import UserError
from sdlora.model.loading import load_components
from sdlora.training.loop import train
from sdxl_fixtures import tiny_sdxl  # noqa: F401 (fixture)

MAX_PIXELS = 20_000  # small guard so the "decompression bomb" needs no huge file
MIN_SIDE = 32


def png_bytes(img, fmt="PNG", **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise(size=(64, 64), seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def exif_rotated():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise
    return png_bytes(noise((96, 64)), "JPEG", exif=exif.tobytes())


def palette_with_transparency():
    img = Image.new("P", (64, 64), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.paste(1, (0, 0, 32, 64))
    return png_bytes(img, transparency=0)


# Images that are odd but usable: converted, kept.
CONVERTED = {
    "cmyk.jpg": lambda: png_bytes(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG"),
    "grey.png": lambda: png_bytes(noise().convert("L")),
    "grey_alpha.png": lambda: png_bytes(noise().convert("LA")),
    "palette_alpha.png": palette_with_transparency,
    "sixteen_bit.png": lambda: png_bytes(Image.fromarray(np.full((64, 64), 65535, dtype=np.uint16))),
    "exif_rotated.jpg": exif_rotated,
}
# Images that are refused, with a word of the reason each must be reported with.
BAD_IMAGES = {
    "truncated.png": (lambda: png_bytes(noise())[:300], "cannot decode"),
    "zero_bytes.png": (lambda: b"", "empty file"),
    "text_file.png": (lambda: b"this is not an image\n", "not a readable image"),
    "tiny.png": (lambda: png_bytes(noise((10, 10))), "smaller than data.min_image_side"),
    "bomb.png": (lambda: png_bytes(noise((200, 120))), "exceeds data.max_image_pixels"),
}
# Caption problems (the image itself is fine).
BAD_CAPTIONS = {
    "no_caption.png": (None, "no caption file"),
    "empty_caption.png": (b"  \n", "is empty"),
    "latin1_caption.png": ("caf\u00e9".encode("latin-1"), "not UTF-8"),
}


def write_broken_folder(root):
    root.mkdir(parents=True)
    (root / "good.png").write_bytes(png_bytes(noise()))
    (root / "good.txt").write_text("a good image")
    for name, make in CONVERTED.items():
        (root / name).write_bytes(make())
        (root / name).with_suffix(".txt").write_text(f"converted {name}")
    for name, (make, _) in BAD_IMAGES.items():
        (root / name).write_bytes(make())
        (root / name).with_suffix(".txt").write_text(f"bad {name}")
    for name, (caption, _) in BAD_CAPTIONS.items():
        (root / name).write_bytes(png_bytes(noise()))
        if caption is not None:
            (root / name).with_suffix(".txt").write_bytes(caption)
    (root / "dup.png").write_bytes(png_bytes(noise()))
    (root / "dup.jpg").write_bytes(png_bytes(noise(), "JPEG"))
    (root / "dup.txt").write_text("which one?")
    return root


def config(tiny_model, tmp_path, folder, **data):
    return validate({"model": {"path": str(tiny_model)}, "output": {"dir": str(tmp_path / "run")},
                     "data": {"path": str(folder), "resolution": 64, "min_image_side": MIN_SIDE,
                              "max_image_pixels": MAX_PIXELS, **data},
                     "train": {"max_steps": 2, "batch_size": 2}, "lora": {"rank": 4, "alpha": 4},
                     "log": {"tracker": "none"}})


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    return write_broken_folder(tmp_path_factory.mktemp("bad") / "images")


@pytest.fixture(scope="module")
def comps(tiny_model):
    return load_components(str(tiny_model))


def test_skip_keeps_the_usable_images_and_lists_every_bad_one_with_its_reason(tmp_path, tiny_model, comps, broken):
    lines = []
    data = build_training_data(config(tiny_model, tmp_path, broken), comps, say=lines.append)
    assert sorted(s.item.path.name for s in data.samples) == sorted(["good.png", *CONVERTED])
    reasons = {p.name: r for p, r in data.skipped}
    expected = {**{n: w for n, (_, w) in BAD_IMAGES.items()}, **{n: w for n, (_, w) in BAD_CAPTIONS.items()},
                "dup.png": "duplicate name", "dup.jpg": "duplicate name"}
    assert set(reasons) == set(expected)
    for name, word in expected.items():
        assert word in reasons[name], (name, reasons[name])
    report = "\n".join(lines)
    assert f"{len(data.samples)} images, {len(expected)} skipped" in report
    assert all(name in report for name in expected)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_skip_trains_on_the_good_images(tmp_path, request, broken, family):
    """SDXL too: the converted images (odd modes, EXIF rotations, sizes) reach its size and crop conditioning."""
    model = request.getfixturevalue("tiny_model" if family == "sd1" else "tiny_sdxl")
    result = train(config(model, tmp_path, broken), log=lambda *a: None)
    assert result.step == 2 and result.adapter_path.is_file() and all(np.isfinite(result.losses))


@pytest.mark.parametrize("name", [*BAD_IMAGES, *BAD_CAPTIONS])
def test_fail_stops_naming_the_bad_file(tmp_path, tiny_model, comps, name):
    folder = write_broken_folder(tmp_path / "all")
    lone = tmp_path / "one"
    lone.mkdir()
    for f in folder.iterdir():  # good.png, plus the one bad image and its caption (if any)
        if f.stem in ("good", name.rsplit(".", 1)[0]):
            f.rename(lone / f.name)
    with pytest.raises(UserError, match=rf"bad data: .*{name}: ") as e:
        build_training_data(config(tiny_model, tmp_path, lone, on_error="fail"), comps, say=lambda *a: None)
    assert "\n" not in str(e.value)


def test_fail_stops_before_training_and_the_cli_exits_2_naming_the_first_bad_file(tmp_path, tiny_model, broken):
    cfg = config(tiny_model, tmp_path, broken, on_error="fail")
    with pytest.raises(UserError, match=r"bad data: .*bomb\.png: "):  # the first bad file in name order
        train(cfg, log=lambda *a: None)
    # stopped before the run started: nothing written (run.json included), so the corrected command reuses the folder
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
    result = train(config(tiny_model, tmp_path, broken), log=lambda *a: None)
    assert result.step == 2 and json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "finished"
    path = tmp_path / "c.yaml"
    path.write_text(f"model:\n  path: {tiny_model}\ndata:\n  path: {broken}\n  on_error: fail\n  resolution: 64\n"
                    f"  max_image_pixels: {MAX_PIXELS}\n  min_image_side: {MIN_SIDE}\noutput:\n  dir: {tmp_path / 'cli'}\n"
                    "log:\n  tracker: none\n")
    proc = subprocess.run([sys.executable, "-m", "sdlora.cli", "train", "--config", str(path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "bomb.png" in proc.stderr.strip().splitlines()[-1]


def test_an_empty_dataset_is_a_clear_error(tmp_path, tiny_model, comps):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "zero.png").write_bytes(b"")
    (folder / "zero.txt").write_text("nothing")
    with pytest.raises(UserError, match=r"no usable images in .*empty \(1 skipped; first: .*zero\.png: empty file\)"):
        build_training_data(config(tiny_model, tmp_path, folder), comps, say=lambda *a: None)


def test_odd_modes_become_the_rgb_picture_they_show(tmp_path):
    def opened(name, data):
        (tmp_path / name).write_bytes(data)
        return np.asarray(open_checked(tmp_path / name, min_side=1, max_pixels=MAX_PIXELS), dtype=int)

    assert np.abs(opened("cmyk.jpg", CONVERTED["cmyk.jpg"]()) - [255, 0, 0]).max() <= 3  # red, not inverted
    assert (opened("sixteen_bit.png", CONVERTED["sixteen_bit.png"]()) == 255).all()  # 65535 -> 255, not clipped junk
    half = png_bytes(Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16)))
    assert (opened("half.png", half) == 128).all()
    pal = opened("palette_alpha.png", palette_with_transparency())
    assert (pal[:, 32:] == 255).all() and (pal[:, :32] == [0, 0, 255]).all()  # transparent -> white
    assert opened("exif_rotated.jpg", exif_rotated()).shape == (96, 64, 3)  # upright: 64 wide, 96 tall
    with pytest.raises(BadImage, match="exceeds data.max_image_pixels"):
        opened("big.png", png_bytes(noise((300, 300))))
