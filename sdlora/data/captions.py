"""Caption transforms, applied each time a caption is used, driven by a caller-supplied RNG so the result
is a pure function of (seed, epoch, position).

Order: caption dropout (the whole caption becomes "", prefix and suffix included: an unconditional
sample) -> split into comma-separated tags -> the first keep_tokens tags stay in front, in order ->
tag dropout on the rest -> shuffle the rest -> join with ", " -> prefix + caption + suffix
(concatenated as written: put your own separator in the prefix/suffix, e.g. "sks person, ").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # type only: the config imports the data package
    from sdlora.config import CaptionOptions


def split_tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def transform_caption(caption: str, opts: CaptionOptions, rng: np.random.Generator) -> str:
    # Every random draw is made whether or not its option is on, so turning one option on does not
    # change the draws the others see.
    drop_caption = rng.random() < opts.caption_dropout
    tags = split_tags(caption)
    kept, rest = tags[: opts.keep_tokens], tags[opts.keep_tokens:]
    keep_mask = rng.random(len(rest)) >= opts.tag_dropout
    order = rng.permutation(len(rest))
    if drop_caption:
        return ""
    keep = keep_mask if opts.tag_dropout > 0 else np.ones(len(rest), dtype=bool)
    indices = order if opts.shuffle_tags else range(len(rest))
    rest = [rest[i] for i in indices if keep[i]]
    if opts.shuffle_tags or opts.tag_dropout > 0 or opts.keep_tokens:
        body = ", ".join(kept + rest)
    else:
        body = caption  # untouched: no tag options asked for, so commas and spacing stay as written
    return f"{opts.prefix}{body}{opts.suffix}"


def base_caption(caption: str, opts: CaptionOptions) -> str:
    """The longest form a caption takes (no dropout): what the 75-token truncation count is based on."""
    return f"{opts.prefix}{caption}{opts.suffix}"


def count_truncated(captions: list[str], tokenizer, max_token_length: int = 75) -> int:
    """Captions longer than `max_token_length` content tokens (75: the CLIP window; 150, 225: chunked)."""
    if not captions:
        return 0
    ids = tokenizer(list(captions), truncation=False, padding=False, add_special_tokens=False).input_ids
    return sum(len(x) > max_token_length for x in ids)
