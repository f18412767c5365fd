"""SD3 / SD3.5 text conditioning, exactly as `StableDiffusion3Pipeline.encode_prompt` builds it (diffusers 0.42,
`pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py`: `_get_clip_prompt_embeds`, `_get_t5_prompt_embeds`,
`encode_prompt`), as pure functions of the encoders and the token ids, so that training can cache, drop or penalise
each encoder's output and still hand the transformer what the pipeline hands it at sampling time.

- CLIP-L (`text_encoder`) and CLIP-G (`text_encoder_2`), both `CLIPTextModelWithProjection`, 77 tokens each (padded
  to max length, truncated; no attention mask): their penultimate hidden states, `hidden_states[-2]`, *without* the
  final layer norm, concatenated on the feature axis (768 + 1280 = 2048 in the real models), then zero-padded to T5's
  width (the transformer's `joint_attention_dim`, 4096).
- T5 (`text_encoder_3`, `T5EncoderModel`): its last hidden state over `t5_max_length` tokens (padded, truncated,
  end-of-sequence appended; the pipeline's `max_sequence_length`, 256 by default), appended on the sequence axis:
  `encoder_hidden_states` is (B, 77 + t5_max_length, joint_attention_dim).
- Without T5 (`text_encoder_3=None`, which the pipeline allows): zeros of shape (B, t5_max_length, joint_attention_dim)
  in T5's place, in CLIP-L's dtype.
- `pooled_projections`: CLIP-L's and CLIP-G's projected pooled outputs (`text_embeds`, output [0]) concatenated,
  (B, 768 + 1280 = 2048).
- Clip skip, in the pipeline's sense: None is the penultimate layer; `k` takes `hidden_states[-(k + 2)]` (still no
  final layer norm). So sdlora's `clip_skip: N` ("the N-th last layer", A1111's convention, with the final layer norm
  on SD 1.x) corresponds to the pipeline's `k = N - 2` here, and SD3's default is N = 2 without the norm. The pipeline
  applies clip skip to the prompt only, never to its negative prompt.
- dtypes: both CLIP outputs are cast to CLIP-L's dtype, T5's output stays in T5's (the pipeline's casts).

Caption dropout / the empty prompt: the pipeline's unconditional input for classifier-free guidance is the *encoded
empty string* `""` through all three encoders (`negative_prompt or ""`), not zeros; the only zeros it ever feeds are
T5's absent output. So a dropped caption is the caption `""` (encode_sd3 of tokenize_sd3([""])), which is what the
model is guided against at sampling; tested against the pipeline's negative embeddings. (kohya's sd3 strategy zeroes
each encoder's output on dropout instead, `library/strategy_sd3.py`; that is a different unconditional input.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SD3Tokens:
    """Token ids for the three encoders: clip_l, clip_g (B, 77); t5 (B, t5_max_length) or None without T5."""

    clip_l: torch.Tensor
    clip_g: torch.Tensor
    t5: torch.Tensor | None


def tokenize_sd3(captions: list[str], tokenizer, tokenizer_2, tokenizer_3=None,
                 t5_max_length: int = 256) -> SD3Tokens:
    """The ids the pipeline feeds each encoder: CLIP padded/truncated to the CLIP tokenizer's length (77), T5 to
    `t5_max_length` with its end-of-sequence token; `tokenizer_3` None gives `t5=None`."""
    def clip(tok):
        return tok(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                   return_tensors="pt").input_ids

    t5 = None
    if tokenizer_3 is not None:
        t5 = tokenizer_3(captions, padding="max_length", max_length=t5_max_length, truncation=True,
                         add_special_tokens=True, return_tensors="pt").input_ids
    return SD3Tokens(clip_l=clip(tokenizer), clip_g=clip(tokenizer_2), t5=t5)


def clip_outputs(text_encoder, input_ids: torch.Tensor, clip_skip: int | None = None):
    """(hidden (B, 77, width), pooled (B, projection)) of a `CLIPTextModelWithProjection`: `hidden_states[-2]`
    (None) or `hidden_states[-(clip_skip + 2)]`, no final layer norm; the projected pooled output."""
    out = text_encoder(input_ids.to(text_encoder.device), output_hidden_states=True)
    hidden = out.hidden_states[-2] if clip_skip is None else out.hidden_states[-(clip_skip + 2)]
    return hidden, out[0]


def t5_output(text_encoder_3, input_ids: torch.Tensor) -> torch.Tensor:
    """T5's last hidden state (B, L, d_model) in its own dtype (no attention mask, as the pipeline)."""
    return text_encoder_3(input_ids.to(text_encoder_3.device))[0].to(dtype=text_encoder_3.dtype)


def join_sd3(clip_l_hidden: torch.Tensor, clip_g_hidden: torch.Tensor, t5_hidden: torch.Tensor,
             clip_l_pooled: torch.Tensor, clip_g_pooled: torch.Tensor, dtype: torch.dtype):
    """Assemble the transformer's inputs from the encoders' outputs: `encoder_hidden_states`
    (B, 77 + L, T5 width) = [CLIP-L | CLIP-G, zero-padded to T5's width] then T5's tokens; `pooled_projections`
    (B, P_l + P_g). `dtype`: CLIP-L's, to which both CLIP hidden states are cast (as the pipeline)."""
    clip = torch.cat([clip_l_hidden.to(dtype), clip_g_hidden.to(dtype)], dim=-1)
    clip = torch.nn.functional.pad(clip, (0, t5_hidden.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5_hidden], dim=-2), torch.cat([clip_l_pooled, clip_g_pooled], dim=-1)


def t5_absent(batch: int, t5_max_length: int, joint_attention_dim: int, dtype: torch.dtype, device) -> torch.Tensor:
    """What the pipeline feeds in T5's place without `text_encoder_3`: zeros (B, t5_max_length, joint_attention_dim)."""
    return torch.zeros((batch, t5_max_length, joint_attention_dim), dtype=dtype, device=device)


def encode_sd3(tokens: SD3Tokens, text_encoder, text_encoder_2, text_encoder_3=None, *, joint_attention_dim: int,
               t5_max_length: int = 256, clip_skip: int | None = None):
    """(encoder_hidden_states, pooled_projections) for `SD3Transformer2DModel`, equal to
    `StableDiffusion3Pipeline.encode_prompt`'s prompt outputs for the same captions (tested bit-identical on the
    tiny models). `joint_attention_dim` (the transformer config's, T5's width) and `t5_max_length` shape T5's zeros
    when `text_encoder_3` is None; with T5, the length is that of `tokens.t5`.
    Raises ValueError when T5 ids are missing for a present T5."""
    hidden_l, pooled_l = clip_outputs(text_encoder, tokens.clip_l, clip_skip)
    hidden_g, pooled_g = clip_outputs(text_encoder_2, tokens.clip_g, clip_skip)
    if text_encoder_3 is not None:
        if tokens.t5 is None:
            raise ValueError("T5 is present but no T5 token ids were given (tokenize_sd3 without tokenizer_3)")
        t5 = t5_output(text_encoder_3, tokens.t5)
    else:
        t5 = t5_absent(tokens.clip_l.shape[0], t5_max_length, joint_attention_dim, text_encoder.dtype,
                       hidden_l.device)
    return join_sd3(hidden_l, hidden_g, t5, pooled_l, pooled_g, dtype=text_encoder.dtype)
