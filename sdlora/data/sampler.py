"""The order of an epoch: global batches of one bucket each, a pure function of (seed, epoch).

Every random choice in the data pipeline comes from `rng_for(seed, epoch, purpose, ...)`, a generator
seeded from those integers alone: no global RNG, nothing that depends on the number of workers or
processes. Regenerating epoch e and skipping to batch i reproduces exactly what an uninterrupted run
sees there.

A global batch holds `batch_size * num_processes` images of one bucket; process r takes the slice
[r*batch_size:(r+1)*batch_size]. A bucket whose image count (with repeats) is not a multiple of the
global batch has its last batch filled by continuing from the start of that bucket's shuffled order
(so nothing is dropped and a bucket smaller than a batch still trains; a few images appear twice in
that epoch).
"""

from __future__ import annotations

import numpy as np

ORDER, BATCH_ORDER, SAMPLE, CAPTION_LINE, WILDCARD = 0, 1, 2, 3, 4  # purposes: streams of draws that must not overlap


def rng_for(seed: int, epoch: int, purpose: int, *position: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, purpose, *position])


def epoch_batches(buckets: list[tuple[int, int]], repeats: list[int], global_batch: int, seed: int,
                  epoch: int) -> list[list[int]]:
    """Global batches of sample indices for one epoch; sample i sits in bucket buckets[i], repeats[i] times."""
    members: dict[tuple[int, int], list[int]] = {}
    for i, (bucket, n) in enumerate(zip(buckets, repeats)):
        members.setdefault(bucket, []).extend([i] * n)
    batches = []
    for k, bucket in enumerate(sorted(members)):
        pool = members[bucket]
        order = [pool[j] for j in rng_for(seed, epoch, ORDER, k).permutation(len(pool))]
        padded = -(-len(order) // global_batch) * global_batch
        order = [order[j % len(order)] for j in range(padded)]
        batches += [order[j:j + global_batch] for j in range(0, padded, global_batch)]
    return [batches[j] for j in rng_for(seed, epoch, BATCH_ORDER).permutation(len(batches))]
