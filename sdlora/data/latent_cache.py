"""Cached VAE latent distributions (mean, std; unscaled), in memory or on disk.

A disk entry is one safetensors file named by a key that hashes everything the latent depends on:
the image file's bytes (sha256), the bucket, the resize and crop, the flip, how pixels are prepared
(PIXEL_RECIPE) and the VAE's identity (its config, dtype and every weight). A changed image, crop or
VAE therefore misses the cache and is encoded again; a second run on the same data encodes nothing.
Writes are atomic (sdlora.util.atomic), so a killed run leaves only whole entries. Stale entries are never
read again and can be deleted with the folder at any time.

With flip on, both orientations are cached: the flip of a latent is not the latent of the flipped image.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from sdlora.util import atomic

PIXEL_RECIPE = "exif+rgb-white+lanczos+crop+[-1,1]/v1"  # bump when image preparation changes


def vae_fingerprint(vae) -> str:
    """Hash of the VAE's config, dtype and weights (about a second for an SD VAE; done once per run)."""
    h = hashlib.sha256()
    h.update(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def entry_key(content_sha256: str, bucket, resized, offset, flip: bool, vae_id: str) -> str:
    parts = [content_sha256, f"{bucket[0]}x{bucket[1]}", f"{resized[0]}x{resized[1]}",
             f"{offset[0]},{offset[1]}", "flip" if flip else "noflip", vae_id, PIXEL_RECIPE]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


class DiskLatentStore:
    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        from safetensors.torch import load_file

        p = self.path(key)
        if not p.is_file():
            return None
        try:
            t = load_file(str(p))
            return t["mean"], t["std"]
        except Exception:  # a damaged entry (e.g. a disk error) is recomputed, not fatal
            return None

    def put(self, key: str, mean: torch.Tensor, std: torch.Tensor) -> None:
        atomic.save_safetensors(self.path(key), {"mean": mean.float(), "std": std.float()},
                                metadata={"format": "sdlora-latent", "recipe": PIXEL_RECIPE})
