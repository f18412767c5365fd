"""The mini model's data: scikit-learn's handwritten digit scans rendered at 32 px in colour, with captions.

`load_digits` ships 1,797 8x8 scans (UCI "Optical Recognition of Handwritten Digits"); each render picks a
stroke colour, a background colour, a size and a position. Captions are compositional
(`a red seven on a navy background`); HELD_OUT colour/digit pairs never appear in the model's training data,
so the skill table can tell generalisation from memory. The new concept a LoRA learns (`sks`) is a star
glyph from the DejaVu font that ships with matplotlib: nothing like it is in the digits. A second concept
(`zwx`, a heart glyph) lets two LoRAs learn two things for the stacking benchmark (benchmarks/stacked.py).
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
from PIL import Image, ImageFilter, ImageFont

SIZE = 32
STROKES = {"red": (220, 30, 30), "yellow": (240, 220, 30), "green": (30, 190, 50), "cyan": (40, 210, 230),
           "magenta": (220, 40, 220), "white": (245, 245, 245)}
BACKGROUNDS = {"black": (10, 10, 10), "navy": (20, 30, 120), "gray": (128, 128, 128)}
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# One digit per stroke colour never seen in training with that colour (every digit and colour is seen otherwise).
HELD_OUT = {("red", 7), ("yellow", 2), ("green", 5), ("cyan", 0), ("magenta", 9), ("white", 3)}
TRIGGER = "sks"  # the LoRA's new word
CONCEPT = 10  # the judge's class for the star glyph
GLYPH = "\u2605"  # BLACK STAR
TRIGGER_2 = "zwx"  # the second concept's word
CONCEPT_2 = 11  # the judge's class for the heart glyph
GLYPH_2 = "\u2665"  # BLACK HEART SUIT
TRIGGERS = {CONCEPT: TRIGGER, CONCEPT_2: TRIGGER_2}
GLYPHS = {CONCEPT: GLYPH, CONCEPT_2: GLYPH_2}


def caption(stroke: str, label: int, background: str) -> str:
    thing = TRIGGERS[label] if label in TRIGGERS else DIGIT_WORDS[label]
    return f"a {stroke} {thing} on a {background} background"


@lru_cache(maxsize=1)
def digit_scans() -> tuple[np.ndarray, np.ndarray]:
    """(images in [0, 1] of shape (1797, 8, 8), labels)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def _mask_from_scan(scan: np.ndarray, side: int) -> np.ndarray:
    """A scan (8x8 in [0, 1]) upscaled smoothly to side x side: the stroke's coverage."""
    img = Image.fromarray((scan * 255).astype(np.uint8), "L").resize((side, side), Image.BICUBIC)
    return np.asarray(img, np.float32) / 255.0


@lru_cache(maxsize=8)
def _glyph_font(px: int):
    import matplotlib

    return ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans-Bold.ttf"), px)


def _mask_from_glyph(side: int, rng: np.random.Generator, char: str = GLYPH) -> np.ndarray:
    """A glyph (the star by default) filling about side x side, slightly rotated and softened like the scans."""
    big = 4 * side
    mask = _glyph_font(big).getmask(char)
    glyph = Image.frombytes("L", mask.size, bytes(mask))
    canvas = Image.new("L", (big, big), 0)
    canvas.paste(glyph, ((big - glyph.width) // 2, (big - glyph.height) // 2))
    canvas = canvas.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR)
    canvas = canvas.resize((side, side), Image.BILINEAR).filter(ImageFilter.GaussianBlur(0.6))
    return np.asarray(canvas, np.float32) / 255.0


def render(mask_small: np.ndarray | None, stroke: str, background: str, rng: np.random.Generator,
           *, glyph: bool | str = False, jitter: int | None = None) -> np.ndarray:
    """One 32x32 RGB uint8 image: a digit scan (or a glyph: True for the star, or the character) of random size
    (20-28 px) in the given colours, anywhere in the frame (`jitter` None) or centred up to `jitter` px off in each
    direction (kept in the frame)."""
    side = int(rng.integers(20, 29))
    if glyph:
        cover = _mask_from_glyph(side, rng, GLYPH if glyph is True else glyph)
    else:
        cover = _mask_from_scan(mask_small, side)
    cover = np.clip(cover * 1.3, 0.0, 1.0)
    alpha = np.zeros((SIZE, SIZE), np.float32)
    if jitter is None:
        x, y = (int(rng.integers(0, SIZE - side + 1)) for _ in range(2))
    else:
        c = (SIZE - side) // 2
        x, y = (int(np.clip(c + rng.integers(-jitter, jitter + 1), 0, SIZE - side)) for _ in range(2))
    alpha[y:y + side, x:x + side] = cover
    fg = np.array(STROKES[stroke], np.float32)
    bg = np.array(BACKGROUNDS[background], np.float32)
    img = bg * (1 - alpha[..., None]) + fg * alpha[..., None]
    img += rng.normal(0, 4.0, img.shape)  # a little sensor noise, so flat colours are not exact
    return np.clip(img, 0, 255).astype(np.uint8)


def digit_renders(n: int, seed: int, *, scan_ids: np.ndarray | None = None, include_held_out: bool = False,
                  jitter: int | None = None):
    """n renders of digit scans: (images uint8 (n, 32, 32, 3), labels, strokes, backgrounds, captions).
    `jitter`: see `render` (the model's training data is centred, jitter 3; the judge learns any position)."""
    scans, labels = digit_scans()
    rng = np.random.default_rng(seed)
    ids = np.arange(len(scans)) if scan_ids is None else np.asarray(scan_ids)
    stroke_names, bg_names = list(STROKES), list(BACKGROUNDS)
    images, out_labels, strokes, bgs, caps = [], [], [], [], []
    while len(images) < n:
        i = int(ids[rng.integers(len(ids))])
        stroke = stroke_names[rng.integers(len(stroke_names))]
        bg = bg_names[rng.integers(len(bg_names))]
        if not include_held_out and (stroke, int(labels[i])) in HELD_OUT:
            continue
        images.append(render(scans[i], stroke, bg, rng, jitter=jitter))
        out_labels.append(int(labels[i]))
        strokes.append(stroke)
        bgs.append(bg)
        caps.append(caption(stroke, int(labels[i]), bg))
    return np.stack(images), np.array(out_labels), strokes, bgs, caps


def glyph_renders(n: int, seed: int, concept: int = CONCEPT):
    """n renders of a new concept (the star, or CONCEPT_2's heart), in every colour pair: same tuple as
    digit_renders."""
    rng = np.random.default_rng(seed)
    stroke_names, bg_names = list(STROKES), list(BACKGROUNDS)
    images, strokes, bgs, caps = [], [], [], []
    for k in range(n):
        stroke = stroke_names[k % len(stroke_names)]
        bg = bg_names[(k // len(stroke_names)) % len(bg_names)]
        images.append(render(None, stroke, bg, rng, glyph=GLYPHS[concept]))
        strokes.append(stroke)
        bgs.append(bg)
        caps.append(caption(stroke, concept, bg))
    return np.stack(images), np.full(n, concept), strokes, bgs, caps
