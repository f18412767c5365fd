"""One scanned image (a `Sample`): how it is read into pixels, and the latent-cache key of its pixels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from sdlora.data.buckets import Geometry, crop_offset
from sdlora.data.images import BadImage, open_checked
from sdlora.data.latent_cache import entry_key
from sdlora.data.sources import Item
from sdlora.errors import UserError

ENCODE_CHUNK = 8  # images per VAE call while filling the cache


@dataclass(frozen=True)
class Sample:
    """An image that passed the scan, at one base resolution: where it goes and how it is cut. An image trained at
    several base resolutions is one Sample per resolution (same item and size, each its own bucket)."""

    item: Item
    size: tuple[int, int]  # upright (after EXIF), in pixels
    geo: Geometry
    resolution: int  # the base resolution whose bucket table `geo.bucket` comes from


def load_pixels(sample: Sample, offset: tuple[int, int], flip: bool, data) -> torch.Tensor:
    """The image as the VAE sees it: upright RGB, resized to cover its bucket, cropped, maybe flipped, in [-1, 1]."""
    try:
        img = open_checked(sample.item.path, min_side=data.min_image_side, max_pixels=data.max_image_pixels)
    except BadImage as e:
        raise UserError(f"{sample.item.path} changed since the data scan: {e}") from None
    if img.size != sample.size:
        raise UserError(f"{sample.item.path} changed since the data scan: {img.size} != {sample.size}")
    img = cut_to_bucket(img, sample, offset, flip, Image.LANCZOS)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def cut_to_bucket(img: Image.Image, sample: Sample, offset: tuple[int, int], flip: bool, resample) -> Image.Image:
    """Resize to cover the sample's bucket, crop at `offset` (left, top), maybe mirror: the one geometry an image
    and its loss mask both go through."""
    (bw, bh), resized = sample.geo.bucket, sample.geo.resized
    if img.size != resized:
        img = img.resize(resized, resample)
    left, top = offset
    img = img.crop((left, top, left + bw, top + bh))
    return img.transpose(Image.FLIP_LEFT_RIGHT) if flip else img


def center_offset(sample: Sample) -> tuple[int, int]:
    """The crop of a cached latent (cached latents need data.crop=center)."""
    return crop_offset(sample.geo, "center", np.random.default_rng(0))


def cache_key(sample: Sample, flip: bool, content_sha256: str, vae_id: str) -> str:
    offset = center_offset(sample)
    return entry_key(content_sha256, sample.geo.bucket, sample.geo.resized, offset, flip, vae_id)
