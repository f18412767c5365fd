"""Loss masks (data.masked_loss): where in each image the diffusion loss counts.

Where a mask comes from, for an image `<folder>/<stem>.<ext>`, first found wins:
1. `data.mask_dir` set: `<mask_dir>/<stem>.<any image extension>`, read as greyscale (white = 1, black = 0);
2. the image's own alpha channel (RGBA, LA, P with transparency): opaque = 1, transparent = 0;
3. none: the image weighs 1 everywhere (exactly the unmasked loss).

A mask is resized, cropped and flipped with its image (same geometry, bilinear), then averaged over each
latent cell (area pooling by the VAE's downscale factor), so the loss is weighted in latent space.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sdlora.data.images import IMAGE_EXTENSIONS
from sdlora.data.samples import cut_to_bucket
from sdlora.errors import UserError

ALPHA_MODES = ("RGBA", "LA", "La", "RGBa", "PA")
MAX_LISTED = 20  # images named in the all-black warning


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
    mask = _checked_mask(sample, data)
    if mask is None:
        return torch.ones(1, bh // latent_factor, bw // latent_factor)
    return _cut_and_pool(mask, sample, offset, flip, latent_factor)


def _checked_mask(sample, data) -> Image.Image | None:
    mask = read_mask(sample.item.path, data.mask_dir)
    if mask is not None and mask.size != sample.size:
        source = mask_file(sample.item.path, data.mask_dir) or "its alpha channel"
        raise UserError(f"loss mask {source} of {sample.item.path} is {mask.size[0]}x{mask.size[1]}, the image "
                        f"{sample.size[0]}x{sample.size[1]} (a mask must match its image's size)")
    return mask


def _cut_and_pool(mask: Image.Image, sample, offset, flip: bool, latent_factor: int) -> torch.Tensor:
    mask = cut_to_bucket(mask, sample, offset, flip, Image.BILINEAR)
    pixels = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]
    return latent_mask(pixels, latent_factor)[0]


def trains_nothing(sample, data, latent_factor: int) -> bool:
    """Read and check one image's mask at start (wrong size or unreadable: `UserError` naming the file). True when
    the mask weighs 0 wherever the image can be cut: black everywhere, or, with data.crop=center (one crop),
    black in every latent cell of that crop."""
    from sdlora.data.samples import center_offset

    mask = _checked_mask(sample, data)
    if mask is None:
        return False
    if mask.getextrema()[1] == 0:
        return True
    return data.crop == "center" and not _cut_and_pool(mask, sample, center_offset(sample), False,
                                                       latent_factor).any()


def check_masks(samples: list, data, latent_factor: int, say) -> None:
    """The start-up scan of data.masked_loss (docs/data.md): every mask read once, so a wrong size or an unreadable
    file stops the run before the first step; images whose mask weighs 0 everywhere are listed (a warning), and
    when that is every image, nothing would train: `UserError`. A data.mask_dir naming no image's mask is a
    warning (a naming slip would otherwise train unmasked in silence)."""
    from concurrent.futures import ThreadPoolExecutor

    if data.mask_dir and not any(mask_file(s.item.path, data.mask_dir) for s in samples):
        say(f"sdlora: warning: data.mask_dir {data.mask_dir} holds no mask named like any of the {len(samples)} "
            "images (cat.jpg -> cat.png): each image uses its alpha channel, or weighs 1")
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        black = [s.item.path for s, nothing in zip(samples, pool.map(
            lambda s: trains_nothing(s, data, latent_factor), samples)) if nothing]
    if not black:
        return
    where = " in its centre crop" if data.crop == "center" else ""
    if len(black) == len(samples):
        raise UserError(f"data.masked_loss: every image's loss mask is black (weight 0 everywhere{where}): nothing "
                        f"would train (first: {black[0]}; white = 1, black = 0)")
    shown = ", ".join(str(p) for p in black[:MAX_LISTED]) + (", ..." if len(black) > MAX_LISTED else "")
    say(f"sdlora: warning: {len(black)} of {len(samples)} images have an all-black loss mask{where} and train "
        f"nothing: {shown}")


def latent_mask(pixels: torch.Tensor, latent_factor: int) -> torch.Tensor:
    """(B, 1, H, W) pixel mask -> (B, 1, H/f, W/f): the mean over each latent cell's f x f pixels."""
    return F.avg_pool2d(pixels, latent_factor)
