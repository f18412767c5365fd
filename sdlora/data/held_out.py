"""The validation images held out of the training set (validation.num_images; the loss is training/validation.py)."""

from __future__ import annotations

import numpy as np

from sdlora.errors import UserError


def split_held_out(samples: list, count: int, seed: int) -> tuple[list, list]:
    """(training, held out): `count` samples picked by a generator seeded with `seed`, order kept."""
    if count >= len(samples):
        raise UserError(f"validation.num_images: {count} leaves no training images (the data has {len(samples)})")
    picked = set(np.random.default_rng(seed).choice(len(samples), size=count, replace=False).tolist())
    return ([s for i, s in enumerate(samples) if i not in picked], [s for i, s in enumerate(samples) if i in picked])
