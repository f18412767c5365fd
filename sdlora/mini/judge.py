"""A judge that is not the model: what digit (or the star) a 32 px image shows, and in which colours.

Shape: an RBF support-vector classifier (scikit-learn) on the stroke's coverage, cropped to its bounding
box and resized to 16x16, trained on renders of 70% of the real digit scans plus renders of the star and of the
heart (the second concept); its accuracy is measured on renders of the other 30% of the scans (writers it never
saw) and of new stars and hearts.
Colour: read from pixel statistics (the border's median is the background, the pixels furthest from it
the stroke), named by the nearest colour of the palette. Deterministic; fitting takes a few seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from sdlora.mini.data import BACKGROUNDS, CONCEPT, CONCEPT_2, STROKES, digit_renders, digit_scans, glyph_renders

_STROKE_NAMES, _STROKE_RGB = list(STROKES), np.array(list(STROKES.values()), np.float32)
_BG_NAMES, _BG_RGB = list(BACKGROUNDS), np.array(list(BACKGROUNDS.values()), np.float32)
FEATURE_SIDE = 16


def _nearest(rgb: np.ndarray, names: list[str], table: np.ndarray) -> str:
    return names[int(np.argmin(((table - rgb) ** 2).sum(1)))]


def read_colours(img: np.ndarray) -> tuple[str, str, np.ndarray]:
    """(stroke colour name, background colour name, stroke coverage in [0, 1]) of one HxWx3 uint8 image."""
    x = img.astype(np.float32)
    border = np.concatenate([x[:2].reshape(-1, 3), x[-2:].reshape(-1, 3), x[:, :2].reshape(-1, 3),
                             x[:, -2:].reshape(-1, 3)])
    bg = np.median(border, 0)
    dist = np.linalg.norm(x - bg, axis=-1)
    far = dist >= max(30.0, 0.6 * np.percentile(dist, 98))
    stroke = np.median(x[far], 0) if far.any() else bg
    contrast = max(float(np.linalg.norm(stroke - bg)), 30.0)
    return _nearest(stroke, _STROKE_NAMES, _STROKE_RGB), _nearest(bg, _BG_NAMES, _BG_RGB), np.clip(dist / contrast, 0, 1)


def shape_features(coverage: np.ndarray) -> np.ndarray:
    """The coverage cropped to the stroke's bounding box, centred in a square, resized to 16x16."""
    ys, xs = np.nonzero(coverage > 0.35)
    if len(ys) == 0:
        return np.zeros(FEATURE_SIDE * FEATURE_SIDE, np.float32)
    crop = coverage[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    side = max(crop.shape)
    square = np.zeros((side, side), np.float32)
    oy, ox = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    square[oy:oy + crop.shape[0], ox:ox + crop.shape[1]] = crop
    small = Image.fromarray((square * 255).astype(np.uint8), "L").resize((FEATURE_SIDE, FEATURE_SIDE), Image.BILINEAR)
    return np.asarray(small, np.float32).ravel() / 255.0


def _soften(images: np.ndarray, seed: int) -> np.ndarray:
    """Half the training renders blurred a little: generated images come through a VAE decoder."""
    rng = np.random.default_rng(seed)
    out = images.copy()
    for i in range(len(out)):
        if rng.random() < 0.5:
            out[i] = np.asarray(Image.fromarray(out[i]).filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 0.9)))))
    return out


def split_scans(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the scans the judge learns from (70%) and of those it is tested on (30%)."""
    n = len(digit_scans()[1])
    perm = np.random.default_rng(seed).permutation(n)
    cut = int(0.7 * n)
    return np.sort(perm[:cut]), np.sort(perm[cut:])


@dataclass
class Verdict:
    labels: np.ndarray  # 0-9 digits, 10 the star (CONCEPT), 11 the heart (CONCEPT_2)
    strokes: list[str]
    backgrounds: list[str]


class Judge:
    def __init__(self, classifier):
        self.classifier = classifier

    @classmethod
    def fit(cls, seed: int = 0, n_digits: int = 3000, n_glyphs: int = 300, heart: bool = True) -> "Judge":
        """Fitted on renders of 70% of the scans and on the star (and, with `heart`, the heart): 12 classes, or 11
        without the heart, for experiments in which no model was taught it (a rough star then cannot be called a
        heart, a class no run could have learned)."""
        from sklearn.svm import SVC

        train_ids, _ = split_scans(seed)
        d_img, d_lab, *_ = digit_renders(n_digits, seed + 100, scan_ids=train_ids, include_held_out=True)
        g_img, g_lab, *_ = glyph_renders(n_glyphs, seed + 101)
        parts = [(d_img, d_lab), (g_img, g_lab)]
        if heart:
            h_img, h_lab, *_ = glyph_renders(n_glyphs, seed + 103, concept=CONCEPT_2)
            parts.append((h_img, h_lab))
        images = _soften(np.concatenate([im for im, _ in parts]), seed + 102)
        labels = np.concatenate([lab for _, lab in parts])
        feats = np.stack([shape_features(read_colours(im)[2]) for im in images])
        return cls(SVC(C=10.0, gamma="scale").fit(feats, labels))

    def __call__(self, images) -> Verdict:
        """Judge uint8 images (N, 32, 32, 3) or a list of PIL images."""
        arrs = [np.asarray(im.convert("RGB") if isinstance(im, Image.Image) else im) for im in images]
        reads = [read_colours(a) for a in arrs]
        feats = np.stack([shape_features(cov) for _, _, cov in reads])
        return Verdict(self.classifier.predict(feats), [s for s, _, _ in reads], [b for _, b, _ in reads])


def accuracy_on_real_renders(judge: Judge, seed: int = 0, n_digits: int = 3000, n_glyphs: int = 300) -> dict:
    """The judge's own accuracy on renders of scans it never saw (and of new stars), with their true colours."""
    _, test_ids = split_scans(seed)
    d_img, d_lab, d_str, d_bg, _ = digit_renders(n_digits, seed + 200, scan_ids=test_ids, include_held_out=True)
    g_img, g_lab, g_str, g_bg, _ = glyph_renders(n_glyphs, seed + 201)
    h_img, *_ = glyph_renders(n_glyphs, seed + 202, concept=CONCEPT_2)
    v_d, v_g, v_h = judge(d_img), judge(g_img), judge(h_img)
    colour_right = [s == ts and b == tb for s, b, ts, tb in
                    zip(v_d.strokes + v_g.strokes, v_d.backgrounds + v_g.backgrounds, d_str + g_str, d_bg + g_bg)]
    return {"digit": float(np.mean(v_d.labels == d_lab)), "concept": float(np.mean(v_g.labels == CONCEPT)),
            "concept_2": float(np.mean(v_h.labels == CONCEPT_2)),
            "colour": float(np.mean(colour_right)), "n_digits": n_digits, "n_glyphs": n_glyphs}
