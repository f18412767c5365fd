"""Wildcards (`{a|b|c}`, drawn per image and epoch) and several captions per image (one line drawn per use): pure
functions of the run's seed, so a resumed stream is the uninterrupted one, and turning them on moves no other draw."""

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from sdlora.config import validate
from sdlora.data import build_training_data
from sdlora.data.captions import base_caption, expand_wildcards
from sdlora.model.loading import load_components

LINES = ["a red square", "a square drawn in red", "red, square, plain"]


def test_wildcard_groups_escapes_and_unclosed_braces():
    rng = np.random.default_rng(0)
    draws = Counter(expand_wildcards("a {red|green|blue} shape", rng) for _ in range(300))
    assert set(draws) == {"a red shape", "a green shape", "a blue shape"} and min(draws.values()) > 60  # ~100 each
    assert expand_wildcards("{{retro}} {x|y}", None) == "{retro} x"  # doubled braces are literal; None: the first
    assert expand_wildcards("a {b c", np.random.default_rng(0)) == "a {b c"  # not a group: as written


@pytest.fixture(scope="module")
def comps(tiny_model):
    return load_components(str(tiny_model))


def _folder(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    rng = np.random.default_rng(0)
    captions = {"a.png": "a {circle|square|star} on white", "b.png": "\n".join(LINES) + "\n", "c.png": "plain, no variants"}
    for name, caption in captions.items():
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / name)
        (folder / name).with_suffix(".txt").write_text(caption, encoding="utf-8")
    return folder


def _cfg(tiny_model, tmp_path, folder, **data):
    return validate({"model": {"path": str(tiny_model)}, "output": {"dir": str(tmp_path / "run")},
                     "data": {"subsets": [{"path": str(folder), "repeats": 4}], "resolution": 64, "flip": True,
                              "crop": "random", **data},
                     "train": {"batch_size": 2, "seed": 3}, "log": {"tracker": "none"}})


def _stream(data, n):
    it = data.batches()
    return [next(it) for _ in range(n)]


def _uses(batches, data, epoch_of):
    """(epoch, image name, caption) of every use, from the batches' captions."""
    out = []
    for k, batch in enumerate(batches):
        for caption in batch["captions"]:
            out.append((epoch_of(k), caption))
    return out


def test_wildcards_are_drawn_per_image_and_epoch_and_lines_per_use(tiny_model, comps, tmp_path):
    folder = _folder(tmp_path)
    cfg = _cfg(tiny_model, tmp_path, folder, wildcards=True, multiline_captions=True)
    data = build_training_data(cfg, comps, say=lambda *a, **k: None)
    per_epoch = data.batches_per_epoch()  # 3 images x 4 repeats / batch 2 = 6
    uses = _uses(_stream(data, per_epoch * 6), data, lambda k: k // per_epoch)
    shapes = {}
    for epoch, caption in uses:
        if caption.endswith("on white"):
            shapes.setdefault(epoch, set()).add(caption)
    assert all(len(s) == 1 for s in shapes.values())  # one draw per image and epoch, whatever the repeats
    assert len({next(iter(s)) for s in shapes.values()}) >= 2  # a new draw each epoch
    lines = Counter(c for _, c in uses if c in LINES)
    assert set(lines) == set(LINES) and sum(lines.values()) == 6 * 4  # one line per use, every line drawn
    by_epoch = [{c for e, c in uses if e == epoch and c in LINES} for epoch in range(6)]
    assert max(len(s) for s in by_epoch) >= 2  # drawn per use: one epoch's 4 uses see different lines
    assert any(c == "plain, no variants" for _, c in uses)


def test_off_the_captions_are_as_before_and_on_no_other_draw_moves(tiny_model, comps, tmp_path):
    folder = _folder(tmp_path)
    quiet = dict(say=lambda *a, **k: None)
    off = _stream(build_training_data(_cfg(tiny_model, tmp_path, folder), comps, **quiet), 12)
    captions_off = {c for b in off for c in b["captions"]}
    assert captions_off == {"a {circle|square|star} on white", " ".join(LINES), "plain, no variants"}
    shuffled = _stream(build_training_data(_cfg(tiny_model, tmp_path, folder, shuffle_tags=True), comps, **quiet), 12)
    on = _stream(build_training_data(_cfg(tiny_model, tmp_path, folder, shuffle_tags=True, wildcards=True,
                                          multiline_captions=True), comps, **quiet), 12)
    plain = 0
    for a, b in zip(shuffled, on):  # the same images, crops, flips and tag shuffles: only the variants differ
        assert np.array_equal(a["pixel_values"].numpy(), b["pixel_values"].numpy())
        for ca, cb in zip(a["captions"], b["captions"]):
            if "variants" in ca:
                plain += 1
                assert ca == cb
    assert plain == 8 and {c for b in shuffled for c in b["captions"] if "variants" in c} == {
        "plain, no variants", "no variants, plain"}


def test_resuming_reproduces_the_drawn_captions(tiny_model, comps, tmp_path):
    folder = _folder(tmp_path)
    cfg = _cfg(tiny_model, tmp_path, folder, wildcards=True, multiline_captions=True)
    quiet = dict(say=lambda *a, **k: None)
    full = _stream(build_training_data(cfg, comps, **quiet), 14)
    first = build_training_data(cfg, comps, **quiet)
    it = first.batches()
    for _ in range(8):  # into the second epoch
        next(it)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = build_training_data(cfg, comps, **quiet)
    resumed.load_state_dict(state)
    assert [b["captions"] for b in _stream(resumed, 6)] == [b["captions"] for b in full[8:]]


def test_fixed_form_is_the_first_line_and_first_option(tiny_model, tmp_path):
    cfg = _cfg(tiny_model, tmp_path, _folder(tmp_path), wildcards=True, multiline_captions=True, prefix="p: ")
    opts = cfg.data_subsets()[0]
    assert base_caption("a {x|y}\nsecond", opts) == "p: a x"
