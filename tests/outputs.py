"""Fixed probe inputs and the UNet / text-encoder outputs compared across models in the tests."""

import json

import torch

from sdlora.model.text import encode, tokenize

PROMPTS = ["a photo of a red circle", "sks person on a blue background"]


@torch.no_grad()
def model_outputs(unet, text_encoder, tokenizer, clip_skip: int = 1, seed: int = 123) -> dict[str, torch.Tensor]:
    """Text-encoder output for fixed prompts, and the UNet's prediction on fixed latents conditioned on it."""
    gen = torch.Generator().manual_seed(seed)
    ids = tokenize(tokenizer, PROMPTS)
    emb = encode(text_encoder, ids, clip_skip).float()
    latents = torch.randn(len(PROMPTS), 4, 8, 8, generator=gen)
    t = torch.tensor([10, 700])
    pred = unet(latents, t, emb).sample.float()
    return {"text_encoder": emb, "unet": pred}


def max_abs_diff(a: dict, b: dict) -> dict[str, float]:
    return {k: float((a[k] - b[k]).abs().max()) for k in a}


def load_pipeline(model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_outputs(pipe, **kw):
    pipe.unet.eval()
    pipe.text_encoder.eval()
    return model_outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer, **kw)


SDXL_SIZES = torch.tensor([[96.0, 80.0, 4.0, 0.0, 64.0, 64.0], [64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])  # time_ids


@torch.no_grad()
def sdxl_model_outputs(unet, text_encoder, text_encoder_2, tokenizer, tokenizer_2, clip_skip: int = 1,
                       seed: int = 123) -> dict[str, torch.Tensor]:
    """SDXL: each encoder's penultimate hidden states, encoder 2's pooled embedding, and the UNet's prediction on
    fixed latents conditioned on them and on fixed micro-conditioning."""
    from sdlora.model.families import SDXL

    gen = torch.Generator().manual_seed(seed)
    ids = [tokenize(t, PROMPTS) for t in (tokenizer, tokenizer_2)]
    cond = SDXL.encode([text_encoder, text_encoder_2], ids, clip_skip)
    latents = torch.randn(len(PROMPTS), 4, 8, 8, generator=gen)
    t = torch.tensor([10, 700])
    pred = unet(latents, t, cond.hidden, added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": SDXL_SIZES}).sample
    return {"text_encoder": cond.per_encoder[0].float(), "text_encoder_2": cond.per_encoder[1].float(),
            "pooled": cond.pooled.float(), "unet": pred.float()}


def load_sdxl_pipeline(model_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_pipeline_outputs(pipe, **kw):
    for m in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        m.eval()
    return sdxl_model_outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pipe.tokenizer_2, **kw)


def quiet(*a, **k):
    """A `log` callback that prints nothing."""


def validation_losses(out):
    """[(step, validation loss)] from a run folder's metrics.jsonl."""
    return [(r["step"], r["validation/loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "validation/loss" in r]
