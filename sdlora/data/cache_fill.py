"""The pass over the data, before training, that fills the latent cache.

memory: every process encodes every image (any process may be handed any image later).
disk: process r encodes entries k with k % num_processes == r that are not on disk yet and writes them; all processes
then meet at a barrier (torch.distributed, when initialised) and read every entry from disk.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sdlora.data.buckets import crop_offset
from sdlora.data.latent_cache import DiskLatentStore, vae_fingerprint
from sdlora.data.samples import ENCODE_CHUNK, cache_key, load_pixels
from sdlora.util.atomic import file_sha256

Key = tuple[int, bool]  # (sample index, flipped)


def cache_folder(cfg) -> Path:
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir)
    return Path(cfg.output.dir).resolve().parent / ".sdlora-cache"


def fill_latent_cache(data, vae, say) -> dict[Key, tuple[torch.Tensor, torch.Tensor]]:
    flips = (False, True) if data.cfg.data.flip else (False,)
    needed = [(i, f) for i in range(len(data.samples)) for f in flips]
    mode = data.cfg.data.cache_latents
    if mode == "memory":
        latents = encode_entries(data, vae, needed)
        say(f"sdlora: latent cache (memory): {len(needed)} latents encoded")
        return latents

    folder = cache_folder(data.cfg)
    store = DiskLatentStore(folder)
    vae_id = vae_fingerprint(vae)
    hashes = [file_sha256(s.item.path) for s in data.samples]
    keys = {n: cache_key(data.samples[n[0]], n[1], hashes[n[0]], vae_id) for n in needed}
    # Shares are cut from `needed`, not from what is missing: another process may already be writing.
    mine = [n for n in needed[data.process_index::data.num_processes] if not store.path(keys[n]).is_file()]
    for n, (mean, std) in encode_entries(data, vae, mine).items():
        store.put(keys[n], mean, std)
    barrier()
    latents = {}
    for n in needed:
        got = store.get(keys[n])
        if got is None:  # damaged or vanished entry: encode it here rather than fail
            got = encode_entries(data, vae, [n])[n]
            store.put(keys[n], *got)
        else:
            data.cache_hits += 1
        latents[n] = got
    say(f"sdlora: latent cache (disk, {folder}): {data.vae_encodes} encoded by this process, "
        f"{len(needed)} entries")
    return latents


def encode_entries(data, vae, entries: list[Key]) -> dict[Key, tuple[torch.Tensor, torch.Tensor]]:
    """Encode centre-cropped (optionally flipped) images, a bucket at a time; (mean, std) as fp32 on the CPU."""
    params = next(vae.parameters())
    by_bucket: dict[tuple[int, int], list[Key]] = {}
    for n in entries:
        by_bucket.setdefault(data.samples[n[0]].geo.bucket, []).append(n)
    out = {}
    for group in by_bucket.values():
        for k in range(0, len(group), ENCODE_CHUNK):
            chunk = group[k:k + ENCODE_CHUNK]
            pixels = []
            for i, flip in chunk:
                sample = data.samples[i]
                offset = crop_offset(sample.geo, "center", np.random.default_rng(0))
                pixels.append(load_pixels(sample, offset, flip, data.cfg.data))
            with torch.no_grad():
                dist = vae.encode(torch.stack(pixels).to(params.device, params.dtype)).latent_dist
            data.vae_encodes += len(chunk)
            for j, n in enumerate(chunk):
                out[n] = (dist.mean[j].float().cpu(), dist.std[j].float().cpu())
    return out


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
