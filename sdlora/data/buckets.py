"""Aspect-ratio buckets: the table of (width, height) sizes, which bucket each image goes to, and how an
image is resized and cropped to it.

There is one table per base resolution (data.resolution, or each of its list; a subset's own resolution):
buckets have sides that are multiples of data.bucket_step, between data.min_side and data.max_side
(min_side is lowered to the resolution where it would exclude the square bucket), and an area of at most
resolution². For each width the tallest height within the area budget is taken, and the transposes,
so every aspect ratio is represented at the largest area that fits. An image goes to the bucket whose
aspect ratio is nearest its own (in log scale). With data.no_upscale only buckets no larger than the
image on both sides qualify; if none does, the image gets its own bucket: its own shape, shrunk into
the area budget and max_side if needed, sides rounded down to the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sdlora.errors import UserError

if TYPE_CHECKING:  # type only: the config validates bucket settings with this module
    from sdlora.config import DataConfig


@dataclass(frozen=True)
class Geometry:
    """How one image becomes one bucket-sized picture: resize to (resized_w, resized_h), then crop."""

    bucket: tuple[int, int]  # (width, height)
    resized: tuple[int, int]


def resolution_list(value: int | list[int]) -> list[int]:
    """data.resolution (or a subset's) as a list of base resolutions, in the order given."""
    return list(value) if isinstance(value, list) else [value]


def bucket_sizes(data: DataConfig, res: int) -> list[tuple[int, int]]:
    """The bucket table of base resolution `res` (pixels; area budget res²) under data's bucket settings, sorted;
    UserError when no bucket fits."""
    step = data.bucket_step
    if not data.bucketing:
        side = res // step * step
        if side < step:
            raise UserError(f"data.resolution {res} is smaller than data.bucket_step {step}")
        return [(side, side)]
    area = res * res
    lo = min(data.min_side, res) // step * step or step
    hi = data.max_side // step * step
    sizes = set()
    for w in range(lo, hi + 1, step):
        h = min(hi, area // w // step * step)
        if h >= lo:
            sizes.add((w, h))
            sizes.add((h, w))
    if not sizes:
        raise UserError(f"no bucket fits: data.min_side {data.min_side}, data.max_side {data.max_side}, "
                        f"data.resolution {res}, data.bucket_step {step}")
    return sorted(sizes)


def assign_bucket(size: tuple[int, int], buckets: list[tuple[int, int]], data: DataConfig, res: int) -> tuple[int, int]:
    """The bucket of an image of `size` (w, h) among `buckets` (bucket_sizes(data, res)); ValueError when the image
    is smaller than the step with data.no_upscale."""
    w, h = size
    candidates = buckets
    if data.no_upscale:
        candidates = [b for b in buckets if b[0] <= w and b[1] <= h]
        if not candidates:
            # Its own bucket: the image's shape, shrunk (never enlarged) into the area budget and max_side.
            step = data.bucket_step
            s = min(1.0, math.sqrt(res ** 2 / (w * h)), data.max_side / max(w, h))
            own = (int(w * s) // step * step, int(h * s) // step * step)
            if min(own) == 0:
                raise ValueError(f"{w}x{h} is smaller than data.bucket_step ({step}) with data.no_upscale")
            return own
    log_ar = math.log(w / h)
    # Nearest aspect ratio; among equals, the larger area (fewer pixels thrown away by the resize).
    return min(candidates, key=lambda b: (abs(math.log(b[0] / b[1]) - log_ar), -b[0] * b[1]))


def geometry(size: tuple[int, int], bucket: tuple[int, int]) -> Geometry:
    """Scale so the image covers the bucket on both sides (the smallest such scale), then crop the rest."""
    w, h = size
    bw, bh = bucket
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    return Geometry(bucket, (rw, rh))


def crop_offset(geo: Geometry, mode: str, rng) -> tuple[int, int]:
    """(left, top) of the crop; `rng` is drawn from in both modes so the other draws do not shift."""
    (bw, bh), (rw, rh) = geo.bucket, geo.resized
    u, v = rng.random(2)
    if mode == "random":
        return int(u * (rw - bw + 1)), int(v * (rh - bh + 1))
    return (rw - bw) // 2, (rh - bh) // 2


def bucket_table(counts: dict[tuple[int, tuple[int, int]], int]) -> str:
    """The start-up table; `counts`: (base resolution, bucket) -> images with repeats. The base resolution is shown
    when there are several."""
    several = len({res for res, _ in counts}) > 1
    rows = [(f"  {res:>4}: " if several else "  ") + f"{w:>4} x {h:<4} {n:>6} images"
            for (res, (w, h)), n in sorted(counts.items(), key=lambda kv: (kv[0][0], -kv[1]) if several else -kv[1])]
    head = ("base resolution: " if several else "") + "width x height, images incl. repeats"
    return f"sdlora: buckets ({head}):\n" + "\n".join(rows)
