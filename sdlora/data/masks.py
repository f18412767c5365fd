"""Loss masks (data.masked_loss): where in each image the diffusion loss counts.

Where a mask comes from, for an image `<folder>/<stem>.<ext>`, first found wins:
1. `data.mask_dir` set: `<mask_dir>/<stem>.<any image extension>`, read as greyscale (white = 1, black = 0);
2. the image's own alpha channel (RGBA, LA, P with transparency): opaque = 1, transparent = 0;
3. none: the image weighs 1 everywhere (exactly the unmasked loss).

A mask is resized, cropped and flipped with its image (same geometry, bilinear), then averaged over each
latent cell (area pooling by the VAE's downscale factor), so the loss is weighted in latent space.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sdlora.data.images import IMAGE_EXTENSIONS
from sdlora.data.samples import cut_to_bucket
from sdlora.errors import UserError

ALPHA_MODES = ("RGBA", "LA", "La", "RGBa", "PA")


def mask_file(image: Path, mask_dir: str | None) -> Path | None:
    if not mask_dir:
        return None
    for ext in IMAGE_EXTENSIONS:
        for candidate in (Path(mask_dir) / f"{image.stem}{ext}", Path(mask_dir) / f"{image.stem}{ext.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def read_mask(image: Path, mask_dir: str | None) -> Image.Image | None:
    """The mask as an 8-bit greyscale picture the size of the upright image, or None (weight 1)."""
    from PIL import ImageOps

    path = mask_file(image, mask_dir)
    try:
        if path is not None:
            return ImageOps.exif_transpose(Image.open(path)).convert("L")
        img = Image.open(image)
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        if img.mode not in ALPHA_MODES:
            return None
        return ImageOps.exif_transpose(img).convert("RGBA").getchannel("A")
    except OSError as e:
        raise UserError(f"cannot read the loss mask of {image} ({path or 'alpha channel'}): {e}") from None


def load_mask(sample, offset: tuple[int, int], flip: bool, data, latent_factor: int) -> torch.Tensor:
    """(1, bucket_h / f, bucket_w / f) in [0, 1]: the mask through the image's resize, crop and flip, then area-pooled."""
    bw, bh = sample.geo.bucket
    mask = read_mask(sample.item.path, data.mask_dir)
    if mask is None:
        return torch.ones(1, bh // latent_factor, bw // latent_factor)
    if mask.size != sample.size:
        raise UserError(f"loss mask of {sample.item.path} is {mask.size[0]}x{mask.size[1]}, the image "
                        f"{sample.size[0]}x{sample.size[1]} (a mask must match its image's size)")
    mask = cut_to_bucket(mask, sample, offset, flip, Image.BILINEAR)
    pixels = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]
    return latent_mask(pixels, latent_factor)[0]


def latent_mask(pixels: torch.Tensor, latent_factor: int) -> torch.Tensor:
    """(B, 1, H, W) pixel mask -> (B, 1, H/f, W/f): the mean over each latent cell's f x f pixels."""
    return F.avg_pool2d(pixels, latent_factor)
