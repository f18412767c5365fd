"""Cached text-encoder outputs for a frozen text encoder.

A frozen encoder's output depends only on the token ids (and clip-skip, fixed per run), so each
distinct token sequence is encoded once. Entries are kept per row, least recently used dropped past
`capacity`, so shuffled or dropped-out captions cannot grow the cache without bound.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from sdlora.model.text import encode

DEFAULT_CAPACITY = 2048  # 2048 x 77 x 768 fp32 ≈ 480 MB for SD 1.5 at most; typical runs hold far fewer captions


class TextEncoderOutputCache:
    """`cache(input_ids) -> embeddings` exactly as `encode(text_encoder, input_ids, clip_skip)` would give them."""

    def __init__(self, text_encoder, clip_skip: int = 1, capacity: int = DEFAULT_CAPACITY):
        self.text_encoder, self.clip_skip, self.capacity = text_encoder, clip_skip, capacity
        self.entries: "OrderedDict[bytes, torch.Tensor]" = OrderedDict()
        self.hits = self.misses = 0

    @torch.no_grad()
    def __call__(self, input_ids) -> torch.Tensor:
        if isinstance(input_ids, (list, tuple)):  # the loop's one-per-text-encoder list (one encoder here)
            (input_ids,) = input_ids
        keys = [row.cpu().numpy().tobytes() for row in input_ids]
        found = {k: self.entries[k] for k in keys if k in self.entries}
        missing = list(dict.fromkeys(k for k in keys if k not in found))  # distinct, in order
        if missing:
            rows = [keys.index(k) for k in missing]
            fresh = encode(self.text_encoder, input_ids[rows], self.clip_skip)
            found.update((k, row.clone()) for k, row in zip(missing, fresh))  # clone: do not pin the whole batch
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        for k in keys:
            self.entries[k] = found[k]
            self.entries.move_to_end(k)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
        return torch.stack([found[k] for k in keys])


def make_text_cache(cfg, text_encoders):
    """The cache when the text encoder is frozen and data.cache_text_encoder_outputs is on, else None.
    `text_encoders`: one encoder, or the family's list of them (SDXL's two are not cached yet)."""
    if isinstance(text_encoders, (list, tuple)):
        if len(text_encoders) > 1:
            return None
        (text_encoders,) = text_encoders
    if cfg.text_encoder.train or not cfg.data.cache_text_encoder_outputs:
        return None
    return TextEncoderOutputCache(text_encoders, cfg.text_encoder.clip_skip)
