"""Caption transforms, applied each time a caption is used, driven by a caller-supplied RNG so the result
is a pure function of (seed, epoch, position).

Before them, a caption's variants are resolved (`pick_variant`): with multiline_captions one of its lines (drawn per
use: (seed, epoch, position)), then with wildcards each `{a|b|c}` group (drawn per image and epoch: (seed, epoch,
image)); each from its own stream, so turning them on changes no other draw.

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


def expand_wildcards(caption: str, rng: np.random.Generator | None) -> str:
    """`{a|b|c}` -> one of a, b, c (uniform; with `rng` None the first); `{{` and `}}` -> literal braces; a `{`
    with no closing `}` stays as written. kohya's enable_wildcard notation (sd-scripts docs/config_README-en.md)."""
    out, i = [], 0
    while i < len(caption):
        pair = caption[i:i + 2]
        if pair in ("{{", "}}"):
            out.append(pair[0])
            i += 2
            continue
        end = caption.find("}", i + 1) if caption[i] == "{" else -1
        if end == -1 or "{" in caption[i + 1:end]:
            out.append(caption[i])
            i += 1
            continue
        options = caption[i + 1:end].split("|")
        out.append(options[int(rng.integers(len(options))) if rng is not None else 0])
        i = end + 1
    return "".join(out)


def pick_variant(caption: str, opts: CaptionOptions, line_rng=None, wildcard_rng=None) -> str:
    """One caption from a caption's variants: a line (multiline_captions; `line_rng` None: the first), then its
    wildcards (wildcards; `wildcard_rng` None: each group's first option). Options off: the caption unchanged."""
    if opts.multiline_captions:
        lines = caption.split("\n")
        caption = lines[int(line_rng.integers(len(lines)))] if line_rng is not None else lines[0]
    if opts.wildcards:
        caption = expand_wildcards(caption, wildcard_rng)
    return caption


def base_caption(caption: str, opts: CaptionOptions) -> str:
    """A caption's fixed form (no dropout; the first line and each wildcard group's first option): what the 75-token
    truncation count, validation, preservation and Fisher prompts use."""
    return f"{opts.prefix}{pick_variant(caption, opts)}{opts.suffix}"


def count_truncated(captions: list[str], tokenizer, max_token_length: int = 75) -> int:
    """Captions longer than `max_token_length` content tokens (75: the CLIP window; 150, 225: chunked)."""
    if not captions:
        return 0
    ids = tokenizer(list(captions), truncation=False, padding=False, add_special_tokens=False).input_ids
    return sum(len(x) > max_token_length for x in ids)
