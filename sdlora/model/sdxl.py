"""SDXL: its family class (two text encoders side by side, a pooled embedding, micro-conditioning) and the
conditioning it gives the UNet. The instance `SDXL` is registered in model/families.py."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdlora.errors import UserError
from sdlora.model.family_base import SUPPORTED, ModelFamily, _sdxl_like


@dataclass
class SDXLConditioning:
    """What SDXL's text side gives the UNet, plus each encoder's own tokens (the regulariser and probe read them)."""

    hidden: torch.Tensor  # (batch, 77, 768 + 1280): both encoders' penultimate states side by side
    pooled: torch.Tensor  # (batch, 1280): text_encoder_2's projected pooled embedding (text_embeds)
    per_encoder: tuple  # (text_encoder's tokens, text_encoder_2's tokens), each (batch, 77, width)

    def rows(self, index) -> "SDXLConditioning":
        return SDXLConditioning(self.hidden[index], self.pooled[index], tuple(e[index] for e in self.per_encoder))

    def to(self, device) -> "SDXLConditioning":
        """The same conditioning on `device`; the per-encoder tokens stay views of the moved hidden states."""
        hidden = self.hidden.to(device)
        return SDXLConditioning(hidden, self.pooled.to(device), tuple(hidden.split(self.widths(), dim=-1)))

    def row(self, i: int) -> "SDXLConditioning":
        """Caption i's conditioning, copied (a cache entry must not keep the whole batch alive); the per-encoder
        tokens are views of its hidden states, which hold them side by side."""
        hidden = self.hidden[i].clone()
        return SDXLConditioning(hidden, self.pooled[i].clone(), tuple(hidden.split(self.widths(), dim=-1)))

    def widths(self) -> list[int]:
        return [e.shape[-1] for e in self.per_encoder]

    @staticmethod
    def stack(rows: list["SDXLConditioning"]) -> "SDXLConditioning":
        """The batch of single captions' conditionings (`row`), in order."""
        hidden = torch.stack([r.hidden for r in rows])
        return SDXLConditioning(hidden, torch.stack([r.pooled for r in rows]),
                                tuple(hidden.split(rows[0].widths(), dim=-1)))


def sdxl_hidden_state(out, clip_skip: int) -> torch.Tensor:
    """SDXL reads the penultimate layer (`hidden_states[-2]`, no final layer norm) at clip_skip=1, the default;
    clip_skip=N takes `hidden_states[-(N + 1)]`, as diffusers' `encode_prompt(clip_skip=N - 1)` does."""
    return out.hidden_states[-(clip_skip + 1)]


def sdxl_encoder_output(text_encoder, input_ids: torch.Tensor, clip_skip: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One SDXL encoder on (batch, 77·k) ids (k chunks of long captions, model/text.py): each chunk encoded on its
    own, hidden states (batch, 77·k, width) side by side as for SD 1.x; the projected pooled embedding (batch,
    width) of the first chunk, as AUTOMATIC1111 and kohya's sd-scripts take it (None for CLIP-L, which has none)."""
    from sdlora.model.text import window_of

    window = window_of(text_encoder)
    batch, width = input_ids.shape
    if width % window:
        raise ValueError(f"token ids of width {width} are not whole chunks of {window}")
    out = text_encoder(input_ids.reshape(-1, window), output_hidden_states=True, return_dict=True)
    hidden = sdxl_hidden_state(out, clip_skip).reshape(batch, width, -1)
    pooled = getattr(out, "text_embeds", None)
    return hidden, (None if pooled is None else pooled.reshape(batch, width // window, -1)[:, 0])


def micro_conditioning(original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: torch.Tensor) -> torch.Tensor:
    """SDXL's `time_ids`: (batch, 6) = original (h, w), crop top-left (top, left), target (h, w), as
    `StableDiffusionXLPipeline._get_add_time_ids` lays them out."""
    return torch.cat([original_size, crop_top_left, target_size], dim=1).float()


@dataclass(frozen=True)
class SDXLFamily(ModelFamily):
    """SDXL: two text encoders (CLIP-L and OpenCLIP bigG) side by side, a pooled embedding and micro-conditioning.

    Caption dropout (and any empty caption) conditions the UNet on zeros, hidden states and pooled embedding
    alike, as SDXL was trained (its embedders' `ucg_rate` zeroes their output) and as its pipeline's
    `force_zeros_for_empty_prompt` samples the unconditional branch; the six micro-conditioning numbers stay."""

    def encode(self, text_encoders, input_ids, clip_skip: int = 1) -> SDXLConditioning:
        te1, te2 = text_encoders
        ids1, ids2 = input_ids
        h1, _ = sdxl_encoder_output(te1, ids1, clip_skip)
        h2, pooled = sdxl_encoder_output(te2, ids2, clip_skip)
        return SDXLConditioning(torch.cat([h1, h2], dim=-1), pooled, (h1, h2))

    def unet_kwargs(self, embeddings: SDXLConditioning, batch: dict | None = None) -> dict:
        if batch is None:
            raise ValueError("SDXL conditioning needs the batch's original sizes and crops")
        device, dtype = embeddings.hidden.device, embeddings.hidden.dtype
        hidden, pooled = embeddings.hidden, embeddings.pooled
        if "captions" in batch:
            keep = torch.tensor([bool(c) for c in batch["captions"]], device=device)
            if not bool(keep.all()):  # dropped or empty captions: zeroed conditioning (see the class docstring)
                hidden = hidden * keep[:, None, None].to(dtype)
                pooled = pooled * keep[:, None].to(pooled.dtype)
        time_ids = micro_conditioning(batch["original_size"], batch["crop_top_left"], batch["target_size"])
        return {"encoder_hidden_states": hidden,
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.to(device, dtype)}}

    def pipeline_embeddings(self, cond: SDXLConditioning, uncond: SDXLConditioning, dtype, *,
                            empty_negative: bool = False) -> dict:
        """An empty negative prompt is zeros, hidden states and pooled embedding alike, as SDXL was trained (the
        class docstring) and as its pipeline's `force_zeros_for_empty_prompt` samples it."""
        if empty_negative:
            uncond = SDXLConditioning(uncond.hidden * 0, uncond.pooled * 0, uncond.per_encoder)
        return {"prompt_embeds": cond.hidden.to(dtype), "negative_prompt_embeds": uncond.hidden.to(dtype),
                "pooled_prompt_embeds": cond.pooled.to(dtype), "negative_pooled_prompt_embeds": uncond.pooled.to(dtype)}

    def text_output(self, name: str, embeddings: SDXLConditioning) -> torch.Tensor:
        if name == "pooled":
            return embeddings.pooled[:, None, :]
        return embeddings.per_encoder[self.text_encoders.index(name)]

    def encode_text_output(self, name: str, text_encoder, input_ids, clip_skip: int = 1) -> torch.Tensor:
        hidden, pooled = sdxl_encoder_output(text_encoder, input_ids, clip_skip)
        return pooled[:, None, :] if name == "pooled" else hidden

    def matches_denoiser(self, config) -> bool:
        return config.get("addition_embed_type") == "text_time"

    def claims_folder(self, index: dict, denoiser_config: dict) -> bool:
        return _sdxl_like(index, denoiser_config)

    def check_folder(self, path, index: dict, denoiser_config: dict) -> None:
        """Both text encoders and the text_time UNet are needed: the refiner (no first text encoder) is refused."""
        pipeline = str(index.get("_class_name", ""))
        if not (self.matches_denoiser(denoiser_config) and "text_encoder_2" in index and "tokenizer_2" in index):
            raise UserError(f"model.path: {path} is an SDXL model ({pipeline or 'text_time UNet'}) without both of its "
                            "parts: needs a text_time UNet and text_encoder_2 / tokenizer_2 in model_index.json")
        if index.get("text_encoder") in (None, [None, None]):
            raise UserError(f"model.path: {path} is an SDXL {pipeline or 'model'} without the first text encoder "
                            f"(the refiner?); {SUPPORTED}: the base model and its fine-tunes")
