"""Cached text-encoder outputs for frozen text encoders.

A frozen encoder's output depends only on the token ids (and clip-skip, fixed per run), so each
distinct caption is encoded once, on the encoders' device (the CPU when they are offloaded: training/offload.py).
Entries are kept per caption, in the encoders' dtype on the token ids' device, the training device (the
training dtype under mixed precision), least recently used dropped past `capacity` captions or past
`data.text_cache_mb` MiB, so shuffled or dropped-out captions cannot grow the cache without bound. A family with
several text encoders (SDXL, SD3) keys each caption by every encoder's token ids and keeps its whole conditioning
(SDXL: both encoders' hidden states and the pooled embedding; SD3: (77 + T5 length) x joint_attention_dim and the
pooled vector).

Bytes per caption (fp32; half in bf16 / fp16): SD 1.5 77 x 768 = 231 KiB; SDXL 77 x 2048 + 1280 = 621 KiB; SD3 /
SD3.5 with T5 at 256 tokens (77 + 256) x 4096 + 2048 = 5.2 MiB, which the 2048-caption count alone would let grow to
10.4 GiB. The default budget, DEFAULT_MAX_MB (2 GiB), holds every caption of 2048 for SD 1.x and SDXL (fp32: 0.45
and 1.2 GiB) and about 390 SD3 captions in fp32 (780 in bf16); past it the least recently used are encoded again.
"""

from __future__ import annotations

import torch

from sdlora.config import DataConfig
from sdlora.training.offload import encode_anywhere
from sdlora.util.lru import CaptionLRU

DEFAULT_CAPACITY = 2048  # captions at most (also bounded by bytes: DEFAULT_MAX_MB, data.text_cache_mb)
DEFAULT_MAX_MB = DataConfig.model_fields["text_cache_mb"].default  # 2048 (module docstring: what it holds per family)


class TextEncoderOutputCache:
    """`cache(input_ids) -> conditioning` exactly as `family.encode(text_encoders, input_ids, clip_skip)` would
    give it; `text_encoders` is one encoder (SD 1.x/2.x) or the family's list of them, `input_ids` likewise.
    The entries live in the shared least-recently-used cache (util/lru.py)."""

    def __init__(self, text_encoders, *, family, clip_skip: int = 1, capacity: int = DEFAULT_CAPACITY,
                 max_bytes: int | None = DEFAULT_MAX_MB * 2**20):
        self.text_encoders = list(text_encoders) if isinstance(text_encoders, (list, tuple)) else [text_encoders]
        self.clip_skip, self.family = clip_skip, family
        self.lru = CaptionLRU(capacity, max_bytes)

    hits = property(lambda self: self.lru.hits)
    misses = property(lambda self: self.lru.misses)
    entries = property(lambda self: self.lru.entries)
    nbytes = property(lambda self: self.lru.nbytes)  # the cached tensors' bytes

    @torch.no_grad()
    def __call__(self, input_ids):
        ids = list(input_ids) if isinstance(input_ids, (list, tuple)) else [input_ids]
        rows = self.lru.rows(ids, lambda subset: encode_anywhere(self.family, self.text_encoders, subset, self.clip_skip),
                             _row)
        return torch.stack(rows) if isinstance(rows[0], torch.Tensor) else type(rows[0]).stack(rows)


def _row(conditioning, j: int):
    """Caption j's entry, copied: a view would keep the whole batch's tensor alive."""
    return conditioning[j].clone() if isinstance(conditioning, torch.Tensor) else conditioning.row(j)


def make_text_cache(cfg, text_encoders, family):
    """The cache when the text encoders are frozen and data.cache_text_encoder_outputs is on, else None.
    `text_encoders`: one encoder, or the family's list of them."""
    if cfg.text_encoder.train or not cfg.data.cache_text_encoder_outputs:
        return None
    return TextEncoderOutputCache(text_encoders, clip_skip=cfg.text_encoder.clip_skip, family=family,
                                  max_bytes=int(cfg.data.text_cache_mb * 2**20))
