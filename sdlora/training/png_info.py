"""The generation settings of a sample as AUTOMATIC1111's `parameters` PNG text chunk, which A1111's PNG Info,
ComfyUI's and most image browsers read.

The layout (A1111 modules/processing.py create_infotext; infotext_utils.parse_generation_parameters reads it back):

    <prompt>
    Negative prompt: <negative prompt>
    Steps: 20, Sampler: DDIM, CFG scale: 7.0, Seed: 3, Size: 512x512, Model: <base model>, Clip skip: 2, RNG: CPU

The negative-prompt line is left out when there is none. A value holding a comma, colon or newline is written as a
JSON string (A1111's `quote`). The adapter is named as A1111 prompts name one, `<lora:NAME:1>` at the end of the
prompt, so pasting the text into A1111 loads it at weight 1 (as the sample was drawn). The noise is drawn by a CPU
generator seeded with Seed for the latent shape (1, 4, H/8, W/8), which is A1111's "RNG: CPU".
"""

from __future__ import annotations

import json
from pathlib import Path


def quote(value) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def parameters_text(sample, *, model: str, lora_name: str, clip_skip: int, sampler: str = "DDIM",
                    guidance_rescale: float = 0.0) -> str:
    """The `parameters` text of one sample (`sample` is a `sample_prompts.SamplePrompt`)."""
    fields = {"Steps": sample.steps, "Sampler": sampler, "CFG scale": sample.guidance_scale, "Seed": sample.seed,
              "Size": f"{sample.width}x{sample.height}", "Model": Path(str(model).rstrip("/\\")).stem,
              "Clip skip": clip_skip, "RNG": "CPU"}
    if guidance_rescale:
        fields["CFG Rescale phi"] = guidance_rescale
    prompt = f"{sample.prompt} <lora:{lora_name}:1>"
    negative = f"\nNegative prompt: {sample.negative_prompt}" if sample.negative_prompt else ""
    return f"{prompt}{negative}\n" + ", ".join(f"{k}: {quote(v)}" for k, v in fields.items())


def png_info(text: str):
    """A PngInfo holding `text` as the `parameters` chunk (for PIL's Image.save(..., pnginfo=...))."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", text)
    return info
