"""The one least-recently-used cache of per-caption values: text-encoder outputs of frozen encoders
(training/text_cache.py) and the embedding-norm penalty's base norms (reg/embedding_norm.py).

A caption is keyed by its token ids (one tensor per text encoder, each of fixed width, so their bytes side by side
are unambiguous). A batch's captions not in the cache are computed once each, distinct ones only, in one batched
call; entries are copies (a view would keep the whole batch's tensor alive); past `capacity` the least recently
used entries are dropped, and past `max_bytes` (the entries' tensors' bytes, `entry_bytes`) too, so shuffled or
dropped-out captions cannot grow it without bound.
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


def entry_bytes(entry) -> int:
    """The bytes an entry's tensors hold: a tensor, or an object whose attributes include tensors (a family's
    conditioning: SDXL's hidden states and pooled embedding, SD3's)."""
    if isinstance(entry, torch.Tensor):
        return entry.nelement() * entry.element_size()
    return sum(entry_bytes(v) for v in vars(entry).values() if isinstance(v, torch.Tensor))


class CaptionLRU:
    """`cache.rows(input_ids, compute, row)`: one value per caption of `input_ids`, in order. `compute(ids)` gets
    the ids of the distinct captions not cached (the same structure as `input_ids`, their rows only) and returns
    their batched value; `row(value, j)` copies caption j's entry out of it. At most `capacity` entries and, with
    `max_bytes`, at most that many bytes of tensors (`nbytes`: the entries' total); a batch's own entries are
    returned even when they alone exceed it (then the cache keeps none of them past the call)."""

    def __init__(self, capacity: int, max_bytes: int | None = None):
        self.capacity, self.max_bytes = capacity, max_bytes
        self.entries: "OrderedDict[bytes, object]" = OrderedDict()
        self.sizes: dict[bytes, int] = {}
        self.nbytes = 0
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
            if k not in self.entries:
                self.sizes[k] = entry_bytes(found[k])
                self.nbytes += self.sizes[k]
            self.entries[k] = found[k]
            self.entries.move_to_end(k)
        while self.entries and (len(self.entries) > self.capacity
                                or (self.max_bytes is not None and self.nbytes > self.max_bytes)):
            dropped, _ = self.entries.popitem(last=False)
            self.nbytes -= self.sizes.pop(dropped)
        return [found[k] for k in keys]
