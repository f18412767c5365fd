"""Costs of the data pipeline at SD sizes, on this machine: the start-up scan (every image decoded), the VAE
identity hash that keys the disk cache (a full-size, randomly initialised SD VAE: no download), and how
fast batches of pixels are made at 512 px.

    python benchmarks/data_pipeline.py            # ~1 minute on a 2-core CPU
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdlora.config import validate  # noqa: E402
from sdlora.data.buckets import bucket_sizes  # noqa: E402
from sdlora.data.latent_cache import vae_fingerprint  # noqa: E402
from sdlora.data.pipeline import TrainingData, scan  # noqa: E402
from sdlora.data.sources import discover  # noqa: E402


def make_images(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    sizes = [(768, 512), (512, 768), (640, 640), (1024, 576)]
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        small = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)  # smooth-ish content: realistic JPEG sizes
        Image.fromarray(small).resize((w, h), Image.BICUBIC).save(folder / f"{i:04d}.jpg", quality=90)
        (folder / f"{i:04d}.txt").write_text(f"image {i}")


def main() -> None:
    from diffusers import AutoencoderKL

    n = 200
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_images(folder, n)
        cfg = validate({"model": {"path": "unused"}, "data": {"path": str(folder), "resolution": 512},
                        "output": {"dir": str(folder / "run")}, "train": {"batch_size": 4}})
        t = time.perf_counter()
        samples, skipped = scan(discover(cfg.data_subsets(), 1.0), cfg.data, bucket_sizes(cfg.data))
        scan_s = time.perf_counter() - t
        data = TrainingData(cfg, samples, skipped)
        it = data.batches()
        next(it)
        t = time.perf_counter()
        for _ in range(10):
            next(it)
        batch_s = (time.perf_counter() - t) / 10
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    t = time.perf_counter()
    vae_fingerprint(vae)
    hash_s = time.perf_counter() - t
    params = sum(p.numel() for p in vae.parameters())
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads default")
    print(f"scan of {n} JPEGs (512x768 .. 1024x576), decode + checks: {scan_s:.2f} s = {1000 * scan_s / n:.1f} ms/image")
    print(f"pixel batches of 4 at ~512x512 (decode, Lanczos resize, crop, tensor): {1000 * batch_s:.0f} ms/batch")
    print(f"VAE identity hash, SD-size VAE ({params / 1e6:.1f} M params, fp32): {hash_s:.2f} s")


if __name__ == "__main__":
    main()
