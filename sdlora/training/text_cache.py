"""Cached text-encoder outputs for frozen text encoders.

A frozen encoder's output depends only on the token ids (and clip-skip, fixed per run), so each
distinct caption is encoded once. Entries are kept per caption, least recently used dropped past
`capacity`, so shuffled or dropped-out captions cannot grow the cache without bound. A family with two
text encoders (SDXL) keys each caption by both encoders' token ids and keeps its whole conditioning:
both encoders' hidden states and the pooled embedding.
"""

from __future__ import annotations

import torch

from sdlora.util.lru import CaptionLRU

DEFAULT_CAPACITY = 2048  # 2048 x 77 x 768 fp32 ≈ 480 MB for SD 1.5 (x 2.7 for SDXL's 2048 wide) at most; typical runs hold far fewer captions


class TextEncoderOutputCache:
    """`cache(input_ids) -> conditioning` exactly as `family.encode(text_encoders, input_ids, clip_skip)` would
    give it; `text_encoders` is one encoder (SD 1.x/2.x) or the family's list of them, `input_ids` likewise.
    The entries live in the shared least-recently-used cache (util/lru.py)."""

    def __init__(self, text_encoders, *, family, clip_skip: int = 1, capacity: int = DEFAULT_CAPACITY):
        self.text_encoders = list(text_encoders) if isinstance(text_encoders, (list, tuple)) else [text_encoders]
        self.clip_skip, self.family = clip_skip, family
        self.lru = CaptionLRU(capacity)

    hits = property(lambda self: self.lru.hits)
    misses = property(lambda self: self.lru.misses)
    entries = property(lambda self: self.lru.entries)

    @torch.no_grad()
    def __call__(self, input_ids):
        ids = list(input_ids) if isinstance(input_ids, (list, tuple)) else [input_ids]
        rows = self.lru.rows(ids, lambda subset: self.family.encode(self.text_encoders, subset, self.clip_skip), _row)
        return torch.stack(rows) if isinstance(rows[0], torch.Tensor) else type(rows[0]).stack(rows)


def _row(conditioning, j: int):
    """Caption j's entry, copied: a view would keep the whole batch's tensor alive."""
    return conditioning[j].clone() if isinstance(conditioning, torch.Tensor) else conditioning.row(j)


def make_text_cache(cfg, text_encoders, family):
    """The cache when the text encoders are frozen and data.cache_text_encoder_outputs is on, else None.
    `text_encoders`: one encoder, or the family's list of them."""
    if cfg.text_encoder.train or not cfg.data.cache_text_encoder_outputs:
        return None
    return TextEncoderOutputCache(text_encoders, clip_skip=cfg.text_encoder.clip_skip, family=family)
