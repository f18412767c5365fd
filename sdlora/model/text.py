"""Text conditioning: tokenising captions and running the text encoder as the UNet sees it.

Long captions (data.max_token_length 150 or 225): the caption's tokens are cut into chunks of 75, each
chunk gets its own start and end tokens and padding to the encoder's window of 77, every chunk is encoded
on its own, and the outputs are concatenated along the sequence (AUTOMATIC1111's layout: 77 positions per
chunk, start/end tokens kept). A caption shorter than the limit still fills every chunk (a chunk with no
text is start, end, padding), so a batch has one width. Ids of width 77·k mean k chunks everywhere below.
"""

from __future__ import annotations

import torch


def tokenize(tokenizer, captions: list[str], max_token_length: int | None = None) -> torch.Tensor:
    """Token ids padded/truncated to the tokenizer's length (77 for CLIP: 75 content tokens + BOS/EOS), or
    with `max_token_length` a multiple of 75 above it, k = max_token_length / 75 chunks of 77: (B, 77·k). A
    tokenizer without a start token (T5) is never chunked: (B, its model_max_length)."""
    window = tokenizer.model_max_length
    if tokenizer.bos_token_id is None:  # not CLIP (SD3's T5): padded and truncated to its length, its EOS appended
        return tokenizer(captions, padding="max_length", max_length=window, truncation=True,
                         return_tensors="pt").input_ids
    if max_token_length is None or max_token_length <= window - 2:
        return tokenizer(captions, padding="max_length", max_length=window, truncation=True,
                         return_tensors="pt").input_ids
    chunks = -(-max_token_length // (window - 2))
    content = tokenizer(captions, add_special_tokens=False, truncation=True, max_length=max_token_length).input_ids
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = []
    for ids in content:
        row = []
        for c in range(chunks):
            piece = list(ids[c * (window - 2):(c + 1) * (window - 2)])
            row += [bos] + piece + [eos] + [pad] * (window - 2 - len(piece))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


def final_layer_norm(text_encoder) -> torch.nn.Module:
    # A data-parallel wrapper holds the model in .module; transformers 5 flattened CLIPTextModel (no .text_model).
    model = getattr(text_encoder, "module", text_encoder)
    return getattr(model, "text_model", model).final_layer_norm


def window_of(text_encoder) -> int:
    return getattr(text_encoder, "module", text_encoder).config.max_position_embeddings


def encode(text_encoder, input_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
    """The conditioning the UNet receives: the last layer's output (clip_skip=1, A1111's convention) or
    the N-th last layer's output passed through the final layer norm (diffusers' `clip_skip=N-1`).
    Ids wider than the encoder's window are chunks of it (see tokenize), encoded apart and concatenated."""
    window = window_of(text_encoder)
    if input_ids.shape[1] > window:
        batch, width = input_ids.shape
        if width % window:
            raise ValueError(f"token ids of width {width} are not whole chunks of {window}")
        out = encode(text_encoder, input_ids.reshape(-1, window), clip_skip)
        return out.reshape(batch, width, out.shape[-1])
    if clip_skip == 1:
        return text_encoder(input_ids, return_dict=True).last_hidden_state
    out = text_encoder(input_ids, output_hidden_states=True, return_dict=True)
    return final_layer_norm(text_encoder)(out.hidden_states[-clip_skip])


def content_mask(input_ids: torch.Tensor, eos_token_id: int, window: int = 77) -> torch.Tensor:
    """True for positions up to and including the first end-of-text token of each row (of each chunk of
    `window` positions, for chunked long captions)."""
    if input_ids.shape[1] > window and input_ids.shape[1] % window == 0:
        batch, width = input_ids.shape
        return content_mask(input_ids.reshape(-1, window), eos_token_id, window).reshape(batch, width)
    is_eos = input_ids == eos_token_id
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(input_ids[:, 0], input_ids.shape[1] - 1))
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
    return positions <= first[:, None]
