"""Cached text-encoder outputs for frozen text encoders.

A frozen encoder's output depends only on the token ids (and clip-skip, fixed per run), so each
distinct caption is encoded once. Entries are kept per caption, least recently used dropped past
`capacity`, so shuffled or dropped-out captions cannot grow the cache without bound. A family with two
text encoders (SDXL) keys each caption by both encoders' token ids and keeps its whole conditioning:
both encoders' hidden states and the pooled embedding.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from sdlora.model.families import SD1

DEFAULT_CAPACITY = 2048  # 2048 x 77 x 768 fp32 ≈ 480 MB for SD 1.5 (x 2.7 for SDXL's 2048 wide) at most; typical runs hold far fewer captions


class TextEncoderOutputCache:
    """`cache(input_ids) -> conditioning` exactly as `family.encode(text_encoders, input_ids, clip_skip)` would
    give it; `text_encoders` is one encoder (SD 1.x/2.x) or the family's list of them, `input_ids` likewise."""

    def __init__(self, text_encoders, clip_skip: int = 1, capacity: int = DEFAULT_CAPACITY, family=SD1):
        self.text_encoders = list(text_encoders) if isinstance(text_encoders, (list, tuple)) else [text_encoders]
        self.clip_skip, self.capacity, self.family = clip_skip, capacity, family
        self.entries: "OrderedDict[bytes, object]" = OrderedDict()
        self.hits = self.misses = 0

    @torch.no_grad()
    def __call__(self, input_ids):
        ids = list(input_ids) if isinstance(input_ids, (list, tuple)) else [input_ids]
        # one key per caption: every encoder's ids side by side (each of fixed width, so the join is unambiguous)
        keys = [b"".join(i[r].cpu().numpy().tobytes() for i in ids) for r in range(ids[0].shape[0])]
        found = {k: self.entries[k] for k in keys if k in self.entries}
        missing = list(dict.fromkeys(k for k in keys if k not in found))  # distinct, in order
        if missing:
            rows = [keys.index(k) for k in missing]
            fresh = self.family.encode(self.text_encoders, [i[rows] for i in ids], self.clip_skip)
            found.update((k, _row(fresh, j)) for j, k in enumerate(missing))
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        for k in keys:
            self.entries[k] = found[k]
            self.entries.move_to_end(k)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
        rows = [found[k] for k in keys]
        return torch.stack(rows) if isinstance(rows[0], torch.Tensor) else type(rows[0]).stack(rows)


def _row(conditioning, j: int):
    """Caption j's entry, copied: a view would keep the whole batch's tensor alive."""
    return conditioning[j].clone() if isinstance(conditioning, torch.Tensor) else conditioning.row(j)


def make_text_cache(cfg, text_encoders, family=SD1):
    """The cache when the text encoders are frozen and data.cache_text_encoder_outputs is on, else None.
    `text_encoders`: one encoder, or the family's list of them."""
    if cfg.text_encoder.train or not cfg.data.cache_text_encoder_outputs:
        return None
    return TextEncoderOutputCache(text_encoders, cfg.text_encoder.clip_skip, family=family)
