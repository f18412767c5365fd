"""Opening images the way training sees them: EXIF orientation applied, any mode turned into RGB, and
every way a file can be bad turned into a `BadImage` with a one-line reason.

Defined behaviour per kind of input (the table in docs/data.md):
- CMYK, L, RGBA/LA (alpha composited on white), P (with or without transparency), 1-bit: converted to RGB.
- 16-bit greyscale (I;16*, I): scaled by 1/257 to 8 bits, then RGB (PIL's own convert would clip at 255).
- EXIF orientation: applied before sizes are measured, so buckets see the upright image.
- Empty, unreadable, truncated, not-an-image, unsupported mode (F, ...), a side < data.min_image_side,
  more than data.max_image_pixels pixels (checked from the header, before any decoding): BadImage.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_EXTS = IMAGE_EXTENSIONS
RGB_DIRECT = {"RGB"}
CONVERTIBLE = {"RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "L", "LA", "La", "P", "PA", "1",
               "I;16", "I;16B", "I;16L", "I;16N", "I"}
WHITE = (255, 255, 255)


class BadImage(Exception):
    """An image the pipeline refuses; str(e) is the reason shown to the user."""


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTS


def open_checked(path: Path, *, min_side: int, max_pixels: int) -> Image.Image:
    """Decode `path` fully and return it upright in RGB, or raise BadImage."""
    try:
        if path.stat().st_size == 0:
            raise BadImage("empty file")
    except OSError as e:
        raise BadImage(f"unreadable ({e.strerror or type(e).__name__})") from None
    with warnings.catch_warnings():
        # Our own max_pixels check below replaces PIL's decompression-bomb warning and error.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        old_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            img = Image.open(path)
            w, h = img.size  # from the header: nothing decoded yet
            if w * h > max_pixels:
                raise BadImage(f"{w}x{h} = {w * h} pixels exceeds data.max_image_pixels ({max_pixels})")
            img.load()
        except BadImage:
            raise
        except UnidentifiedImageError:
            raise BadImage("not a readable image") from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BadImage(f"cannot decode ({first})") from None
        finally:
            Image.MAX_IMAGE_PIXELS = old_limit
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a malformed EXIF block: keep the stored orientation rather than losing the image
        pass
    if min(img.size) < min_side:
        raise BadImage(f"{img.size[0]}x{img.size[1]} is smaller than data.min_image_side ({min_side})")
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in RGB_DIRECT:
        return img
    if mode not in CONVERTIBLE:
        raise BadImage(f"unsupported image mode {mode}")
    if mode.startswith("I"):
        arr = np.asarray(img, dtype=np.float64)
        # 16-bit data (I;16 or a 16-bit PNG read as I) spans 0..65535; 8-bit data read as I spans 0..255.
        scale = 257.0 if arr.max(initial=0) > 255 or mode.startswith("I;16") else 1.0
        img = Image.fromarray(np.clip(np.round(arr / scale), 0, 255).astype(np.uint8), "L")
        mode = "L"
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
