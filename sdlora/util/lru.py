"""The one least-recently-used cache of per-caption values: text-encoder outputs of frozen encoders
(training/text_cache.py) and the embedding-norm penalty's base norms (reg/embedding_norm.py).

A caption is keyed by its token ids (one tensor per text encoder, each of fixed width, so their bytes side by side
are unambiguous). A batch's captions not in the cache are computed once each, distinct ones only, in one batched
call; entries are copies (a view would keep the whole batch's tensor alive); past `capacity` the least recently
used entries are dropped, so shuffled or dropped-out captions cannot grow it without bound.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch


def caption_keys(input_ids) -> list[bytes]:
    """One key per caption (row) of `input_ids`: a (batch, tokens) tensor, or a list of them (one per encoder)."""
    ids = list(input_ids) if isinstance(input_ids, (list, tuple)) else [input_ids]
    return [b"".join(i[r].cpu().numpy().tobytes() for i in ids) for r in range(ids[0].shape[0])]


def tensor_row(batch: torch.Tensor, j: int) -> torch.Tensor:
    return batch[j].clone()


class CaptionLRU:
    """`cache.rows(input_ids, compute, row)`: one value per caption of `input_ids`, in order. `compute(ids)` gets
    the ids of the distinct captions not cached (the same structure as `input_ids`, their rows only) and returns
    their batched value; `row(value, j)` copies caption j's entry out of it."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.entries: "OrderedDict[bytes, object]" = OrderedDict()
        self.hits = self.misses = 0

    def rows(self, input_ids, compute: Callable, row: Callable = tensor_row) -> list:
        keys = caption_keys(input_ids)
        found = {k: self.entries[k] for k in keys if k in self.entries}
        missing = list(dict.fromkeys(k for k in keys if k not in found))  # distinct, in order
        if missing:
            index = [keys.index(k) for k in missing]
            subset = ([i[index] for i in input_ids] if isinstance(input_ids, (list, tuple))
                      else input_ids[index])
            fresh = compute(subset)
            found.update((k, row(fresh, j)) for j, k in enumerate(missing))
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        for k in keys:  # refresh recency, insert new entries, drop the least recently used
            self.entries[k] = found[k]
            self.entries.move_to_end(k)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
        return [found[k] for k in keys]
