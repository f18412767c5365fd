"""Text conditioning: tokenising captions and running the text encoder as the UNet sees it."""

from __future__ import annotations

import torch


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded/truncated to the tokenizer's length (77 for CLIP: 75 content tokens + BOS/EOS)."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def final_layer_norm(text_encoder) -> torch.nn.Module:
    # A data-parallel wrapper holds the model in .module; transformers 5 flattened CLIPTextModel (no .text_model).
    model = getattr(text_encoder, "module", text_encoder)
    return getattr(model, "text_model", model).final_layer_norm


def encode(text_encoder, input_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
    """The conditioning the UNet receives: the last layer's output (clip_skip=1, A1111's convention) or
    the N-th last layer's output passed through the final layer norm (diffusers' `clip_skip=N-1`)."""
    if clip_skip == 1:
        return text_encoder(input_ids, return_dict=True).last_hidden_state
    out = text_encoder(input_ids, output_hidden_states=True, return_dict=True)
    return final_layer_norm(text_encoder)(out.hidden_states[-clip_skip])


def content_mask(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """True for positions up to and including the first end-of-text token of each row."""
    is_eos = input_ids == eos_token_id
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(input_ids[:, 0], input_ids.shape[1] - 1))
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
    return positions <= first[:, None]
