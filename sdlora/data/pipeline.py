"""The training data the loop consumes: scan the sources, apply data.on_error, bucket, cache latents,
and hand out deterministic, resumable batches (see sampler.py for the order and the sharding).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from sdlora.data.buckets import assign_bucket, bucket_sizes, bucket_table, crop_offset, geometry, resolution_list
from sdlora.data.captions import base_caption, count_truncated, pick_variant, transform_caption
from sdlora.data.images import BadImage, open_checked
from sdlora.data.masks import check_masks, load_mask
from sdlora.data.sampler import CAPTION_LINE, SAMPLE, WILDCARD, epoch_batches, rng_for
from sdlora.data.samples import Sample, center_offset, load_pixels
from sdlora.data.sources import Item, Note, Rejected, discover
from sdlora.errors import UserError

MAX_LISTED = 50  # skipped files printed at start; the rest are counted


@dataclass(frozen=True)
class Slot:
    """One image of one batch: which sample, and the random choices made for it at this position."""

    sample: int
    offset: tuple[int, int]
    flip: bool
    caption: str


# ---------------------------------------------------------------------------------------------- build
def build_training_data(cfg, comps, *, num_processes: int = 1, process_index: int = 0, say=print) -> "TrainingData":
    data = cfg.data
    subsets = cfg.data_subsets()
    notes: list[Note] = []
    samples, skipped = scan(discover(subsets, data.prior_loss_weight, notes), data,
                            [resolution_list(s.resolution) for s in subsets])
    held_out, scanned = [], samples
    if cfg.validation.num_images and samples:  # validation images never train (training/validation.py)
        from sdlora.data.held_out import split_held_out

        samples, held_out = split_held_out(samples, cfg.validation.num_images, cfg.validation.seed)
    images = len({s.item for s in samples})
    sizes = sorted({s.resolution for s in samples})
    at = f" at {len(sizes)} base resolutions ({', '.join(map(str, sizes))})" if len(sizes) > 1 else ""
    say(f"sdlora: {images} images{at}, {len(skipped)} skipped")
    for line in note_lines(notes):
        say(line)
    for path, reason in skipped[:MAX_LISTED]:
        say(f"  skipped {path}: {reason}")
    if len(skipped) > MAX_LISTED:
        say(f"  ... and {len(skipped) - MAX_LISTED} more skipped")
    if not samples:
        raise UserError(f"no usable images in {', '.join(s.path for s in subsets)}"
                        + (f" ({len(skipped)} skipped; first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""))
    latent_factor = 2 ** (len(comps.vae.config.block_out_channels) - 1)
    check_bucket_sides(scanned, latent_factor * comps.family.latent_multiple(comps.denoiser), comps.family.title)
    if data.masked_loss:
        check_masks(samples, data, latent_factor, say)
    counts: dict[tuple[int, tuple[int, int]], int] = {}
    for s in samples:
        counts[(s.resolution, s.geo.bucket)] = counts.get((s.resolution, s.geo.bucket), 0) + s.item.repeats
    say(bucket_table(counts))
    limit = data.max_token_length
    truncated = count_truncated([base_caption(s.item.caption, subsets[s.item.subset]) for s in samples],
                                comps.tokenizers[0], limit)
    if truncated:
        say(f"sdlora: {truncated} of {len(samples)} captions are longer than the text encoder's {limit} tokens "
            f"(data.max_token_length) and will be truncated")
    result = TrainingData(cfg, samples, skipped, num_processes=num_processes, process_index=process_index,
                          latent_factor=latent_factor)
    result.held_out = held_out
    result.scanned = scanned  # every usable image in scan order, held-out ones included (the end-of-run row Fisher)
    if data.cache_latents != "none":
        result.fill_cache(comps.vae, say)
    return result


def check_bucket_sides(samples: list[Sample], multiple: int, title: str) -> None:
    """UserError (before any training) when a bucket side is not a multiple of `multiple` pixels: the VAE's pixels
    per latent cell times the denoiser's latent multiple (family.latent_multiple; SD3: 8 x 2)."""
    for s in samples:
        w, h = s.geo.bucket
        if w % multiple or h % multiple:
            raise UserError(f"bucket {w}x{h} (base resolution {s.resolution}, {s.item.path.name}) has a side that is "
                            f"not a multiple of {multiple} pixels, which {title} needs: set data.bucket_step to a "
                            f"multiple of {multiple}")


def note_lines(notes: list[Note], examples: int = 3) -> list[str]:
    """One line per kind of note: the count, the reason, the first few paths."""
    by_reason: dict[str, list[Path]] = {}
    for n in notes:
        by_reason.setdefault(n.reason, []).append(n.path)
    lines = []
    for reason, paths in by_reason.items():
        first = ", ".join(str(p) for p in paths[:examples]) + (", ..." if len(paths) > examples else "")
        lines.append(f"sdlora: note: {len(paths)} x {reason}: {first}")
    return lines


def scan(entries: list[Item | Rejected], data, resolutions: list[list[int]] | None = None
         ) -> tuple[list[Sample], list[tuple[Path, str]]]:
    """Decode every image once (in threads: PIL decodes without the GIL) and make it one Sample per base resolution
    of its subset (`resolutions[item.subset]`; default: data.resolution's for every subset), image after image, each
    image's resolutions in the order given; on_error=fail stops at the first bad entry in discovery order, skip
    collects them all."""
    own = resolution_list(data.resolution)
    tables = {r: bucket_sizes(data, r) for r in own + [r for rs in resolutions or [] for r in rs]}

    def check(entry):
        if isinstance(entry, Rejected):
            return entry.path, entry.reason
        try:
            size = open_checked(entry.path, min_side=data.min_image_side, max_pixels=data.max_image_pixels).size
            return [Sample(entry, size, geometry(size, assign_bucket(size, tables[r], data, r)), r)
                    for r in (resolutions[entry.subset] if resolutions else own)]
        except (BadImage, ValueError) as e:
            return entry.path, str(e)

    samples, skipped = [], []
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for result in pool.map(check, entries):
            if isinstance(result, list):
                samples.extend(result)
            elif data.on_error == "fail":
                pool.shutdown(wait=False, cancel_futures=True)
                raise UserError(f"bad data: {result[0]}: {result[1]} (data.on_error=fail; set data.on_error=skip "
                                "to train without the bad files)")
            else:
                skipped.append(result)
    return samples, skipped


# ------------------------------------------------------------------------------------------- the data
class TrainingData:
    def __init__(self, cfg, samples: list[Sample], skipped, *, num_processes: int = 1, process_index: int = 0,
                 latent_factor: int = 8):
        self.cfg = cfg
        self.latent_factor = latent_factor  # pixels per latent cell along a side (the VAE's downscale)
        self.samples = samples
        self.held_out: list[Sample] = []  # validation.num_images taken out of training
        self.skipped = skipped
        self.num_images = len({s.item for s in samples})  # images; with several resolutions fewer than samples
        self.num_processes, self.process_index = num_processes, process_index
        self.batch_size = cfg.train.batch_size
        self.subsets = cfg.data_subsets()
        self.vae_encodes = 0  # images passed through the VAE encoder by this object (cache fill + on the fly)
        self.cache_hits = 0  # cache entries read from disk
        self.latents: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]] | None = None
        self.masks: dict[tuple[int, bool], torch.Tensor] | None = None  # filled with the latent cache (masked_loss)
        self._epoch, self._index = 0, 0
        self._plan: tuple[int, list[list[int]]] | None = None

    # ---- position (what the trainer has consumed)
    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "index": self._index}

    def load_state_dict(self, state: dict) -> None:
        self._epoch, self._index = int(state["epoch"]), int(state["index"])

    def batches_per_epoch(self, epoch: int = 0) -> int:
        return len(self.plan(epoch))

    # ---- the order
    def plan(self, epoch: int) -> list[list[int]]:
        if self._plan is None or self._plan[0] != epoch:
            global_batch = self.batch_size * self.num_processes
            self._plan = (epoch, epoch_batches([s.geo.bucket for s in self.samples],
                                               [s.item.repeats for s in self.samples],
                                               global_batch, self.cfg.train.seed, epoch))
        return self._plan[1]

    def slots(self, epoch: int, index: int) -> list[Slot]:
        """This process's share of global batch `index` of `epoch`, with every random choice made."""
        global_batch = self.plan(epoch)[index]
        start = self.process_index * self.batch_size
        out = []
        for position in range(start, start + self.batch_size):
            sample_index = global_batch[position]
            sample = self.samples[sample_index]
            rng = rng_for(self.cfg.train.seed, epoch, SAMPLE, index, position)
            offset = crop_offset(sample.geo, self.cfg.data.crop, rng)
            flip = bool(rng.random() < 0.5) and self.cfg.data.flip
            opts, seed = self.subsets[sample.item.subset], self.cfg.train.seed
            text = pick_variant(sample.item.caption, opts,  # their own streams: no other draw moves
                                rng_for(seed, epoch, CAPTION_LINE, index, position) if opts.multiline_captions else None,
                                rng_for(seed, epoch, WILDCARD, sample_index) if opts.wildcards else None)
            caption = transform_caption(text, opts, rng)
            out.append(Slot(sample_index, offset, flip, caption))
        return out

    def batches(self) -> Iterator[dict]:
        """Endless; starts at the position set by load_state_dict and advances as each batch is taken."""
        workers = self.cfg.data.num_workers
        while True:
            epoch, start = self._epoch, self._index
            count = len(self.plan(epoch))
            if start >= count:
                self._epoch, self._index = epoch + 1, 0
                continue
            if workers and self.latents is None:
                lazy = _EpochBatches(self, epoch, start, count)
                made = iter(torch.utils.data.DataLoader(lazy, batch_size=None, num_workers=workers))
            else:
                made = (self.make_batch(self.slots(epoch, i)) for i in range(start, count))
            for i, batch in enumerate(made, start):
                # Advance before handing the batch over: state_dict() then names the NEXT batch, and
                # batches a worker prefetched but the trainer never took are not counted.
                after = (epoch, i + 1) if i + 1 < count else (epoch + 1, 0)
                self._epoch, self._index = after
                yield batch
                if (self._epoch, self._index) != after:
                    break  # load_state_dict() moved the position while we were paused: restart there

    def make_batch(self, slots: list[Slot]) -> dict:
        if self.latents is None:
            return self._pixels_batch(slots)
        means, stds = zip(*(self.latents[(s.sample, s.flip)] for s in slots))
        return {**self._common(slots), "latent_mean": torch.stack(means), "latent_std": torch.stack(stds)}

    def _common(self, slots: list[Slot]) -> dict:
        sizes = [size_conditioning(self.samples[s.sample], s.offset, s.flip) for s in slots]
        common = {**conditioning_fields([s.caption for s in slots], sizes),
                  "loss_weight": torch.tensor([self.samples[s.sample].item.loss_weight for s in slots], dtype=torch.float32),
                  "image_paths": [str(self.samples[s.sample].item.path) for s in slots]}
        if self.cfg.data.masked_loss:
            common["loss_mask"] = torch.stack([self.mask(s) for s in slots])
        return common

    def mask(self, slot: Slot) -> torch.Tensor:
        """(1, h, w) loss mask at latent resolution (data/masks.py); from the cache when latents are cached."""
        if self.masks is not None:
            return self.masks[(slot.sample, slot.flip)]
        return load_mask(self.samples[slot.sample], slot.offset, slot.flip, self.cfg.data, self.latent_factor)

    def _pixels_batch(self, slots: list[Slot]) -> dict:
        pixels = torch.stack([self.pixels(self.samples[s.sample], s.offset, s.flip) for s in slots])
        return {**self._common(slots), "pixel_values": pixels}

    def pixels(self, sample: Sample, offset: tuple[int, int], flip: bool) -> torch.Tensor:
        return load_pixels(sample, offset, flip, self.cfg.data)

    # ---- latents
    def latent_distribution(self, batch: dict, vae) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the VAE latent distribution, unscaled, on the VAE's device and dtype."""
        device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
        if "latent_mean" in batch:
            return batch["latent_mean"].to(device, dtype), batch["latent_std"].to(device, dtype)
        with torch.no_grad():
            dist = vae.encode(batch["pixel_values"].to(device, dtype)).latent_dist
        self.vae_encodes += batch["pixel_values"].shape[0]
        return dist.mean, dist.std

    def fill_cache(self, vae, say=print) -> None:
        from sdlora.data.cache_fill import fill_latent_cache

        self.latents = fill_latent_cache(self, vae, say)
        if self.cfg.data.masked_loss:  # cached with the latents: a cached run never reads an image or a mask again
            self.masks = {(i, flip): load_mask(self.samples[i], center_offset(self.samples[i]), flip, self.cfg.data,
                                               self.latent_factor) for i, flip in self.latents}


def conditioning_fields(captions: list[str], sizes: list[tuple]) -> dict:
    """The batch fields `family.unet_kwargs` reads besides the text conditioning: the captions (SDXL conditions an
    empty one on zeros) and SDXL's micro-conditioning from each image's `size_conditioning`: original_size,
    crop_top_left, target_size, (batch, 2) float32 pixels each. Other families ignore them."""
    original, crop, target = (torch.tensor([list(v) for v in column], dtype=torch.float32) for column in zip(*sizes))
    return {"captions": list(captions), "original_size": original, "crop_top_left": crop, "target_size": target}


def size_conditioning(sample: Sample, offset: tuple[int, int], flip: bool) -> tuple[tuple, tuple, tuple]:
    """SDXL's size and crop conditioning of one image as cut into its batch, each (height, width)-ordered as SDXL
    reads them: the original size (upright, before any resize), the crop's top-left corner in the resized image
    (as SDXL's training and diffusers' SDXL example measure it), and the target size (the bucket). A flipped image
    is cropped from the mirrored side, so its left offset is measured from the other edge."""
    (w, h), (bw, bh), (rw, _) = sample.size, sample.geo.bucket, sample.geo.resized
    left, top = offset
    if flip:
        left = rw - bw - left
    return (h, w), (top, left), (bh, bw)


class _EpochBatches(torch.utils.data.Dataset):
    """Batches start..count-1 of one epoch for DataLoader workers: item k is the whole batch start+k."""

    def __init__(self, data: "TrainingData", epoch: int, start: int, count: int):
        self.data, self.epoch, self.start, self.count = data, epoch, start, count

    def __len__(self):
        return self.count - self.start

    def __getitem__(self, k):
        return self.data.make_batch(self.data.slots(self.epoch, self.start + k))
