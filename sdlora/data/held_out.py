"""The validation images held out of the training set (validation.num_images; the loss is training/validation.py)."""

from __future__ import annotations

import numpy as np

from sdlora.errors import UserError


def split_held_out(samples: list, count: int, seed: int) -> tuple[list, list]:
    """(training, held out): `count` images picked by a generator seeded with `seed`, order kept. An image is held out
    with every base resolution it has (its samples share an item), so no held-out image trains at another size."""
    images = list(dict.fromkeys(s.item for s in samples))  # one entry per image, in scan order
    if count >= len(images):
        raise UserError(f"validation.num_images: {count} leaves no training images (the data has {len(images)})")
    picked = {images[i] for i in np.random.default_rng(seed).choice(len(images), size=count, replace=False).tolist()}
    return [s for s in samples if s.item not in picked], [s for s in samples if s.item in picked]
