"""Output preservation without a regularisation set (`reg.preservation`): the denoiser-side twin of the
embedding-norm penalty.

    term = weight · mean (ε_θ(x_t, t, c_p) − ε_0(x_t, t, c_p))²

on preservation prompts c_p (text unrelated to what is trained), with the step's own noisy latents x_t and
timesteps t. ε_0 is the base model's prediction: the same UNet and text encoder(s) with every adapter
disabled (`adapters_disabled` restores W0 for every init, offsets included), so no second model is held in
memory. ε_θ is the adapted prediction, with gradient through the UNet's adapters and, when the text encoder
trains, through its adapters too. Where the prompt has nothing to do with the subject, the LoRA is pulled
back toward the base (OneTrainer's prior prediction, ai-toolkit's difference/blank-prompt preservation).

The prompts of a step are drawn with their own generator seeded by (train.seed, step): no global RNG is
touched, and a resumed run draws what the uninterrupted one drew. Both predictions go through the step's
`training.step.predict` (which is why this regulariser lives beside the step, not in `reg/`).
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sdlora.errors import UserError
from sdlora.lora.layers import adapters_disabled
from sdlora.model.text import tokenize
from sdlora.training.offload import encode_anywhere
from sdlora.training.step import predict


def remove_trigger_words(caption: str, trigger_words: list[str]) -> str:
    """The caption without the trigger words (whole words), with the tags and spaces they leave empty removed."""
    for word in trigger_words:
        caption = re.sub(rf"(?<!\w){re.escape(word.strip())}(?!\w)", "", caption)
    tags = [" ".join(tag.split()) for tag in caption.split(",")]
    return ", ".join(t for t in tags if t)


def read_prompts_file(path: str) -> list[str]:
    try:
        lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"reg.preservation.prompts_file: cannot read {path}: {e}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UserError(f"reg.preservation.prompts_file: {path} has no prompts (one per line)")
    return prompts


def preservation_prompts(cfg, samples: list) -> list[str]:
    """The prompt pool of `reg.preservation.source`; `samples` are the training images (source=captions)."""
    from sdlora.data.captions import base_caption

    p = cfg.reg.preservation
    if p.source == "empty":
        return [""]
    if p.source == "prompts":
        return list(p.prompts)
    if p.source == "file":
        return read_prompts_file(p.prompts_file)
    subsets = cfg.data_subsets()  # each caption with its own subset's prefix and suffix, as training reads it
    captions = (remove_trigger_words(base_caption(s.item.caption, subsets[s.item.subset]), p.trigger_words)
                for s in samples)
    return list(dict.fromkeys(captions))  # distinct, in data order


def preservation_loss(adapted: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Unweighted: the mean squared difference over every element, in fp32."""
    return F.mse_loss(adapted.float(), base.float())


class Preservation:
    """What the loop calls on due steps: `term(denoiser, encoders, noisy, timesteps, batch, step, autocast)` -> the
    unweighted term, both predictions through `training.step.predict`; `noisy` and `timesteps` are the step's
    (`Noised.noisy`, `.timesteps`); `autocast` is the accelerator's (mixed precision) or none."""

    def __init__(self, cfg, comps, prompts: list[str], process_index: int = 0, num_processes: int = 1,
                 text_cache=None):
        self.cfg, self.comps, self.prompts = cfg, comps, prompts
        self.text_cache = text_cache  # frozen encoders (no adapters): the run's cache gives the base conditioning
        self.every = cfg.reg.preservation.every_steps
        self.process_index, self.num_processes = process_index, num_processes

    def due(self, step: int) -> bool:
        """`step`: the number of the optimiser step being computed (1-based)."""
        return step % self.every == 0

    def prompts_for(self, step: int, count: int) -> list[str]:
        """This process's `count` prompts of step `step`: its slice of the global batch's draw, so the prompts a
        sample gets depend on seed and step only, not on how many processes share the batch."""
        rng = np.random.default_rng((self.cfg.train.seed, step))
        picks = rng.integers(len(self.prompts), size=count * self.num_processes)
        return [self.prompts[i] for i in picks[self.process_index * count:(self.process_index + 1) * count]]

    def token_ids(self, prompts: list[str], device) -> list[torch.Tensor]:
        return [tokenize(t, prompts, self.cfg.data.max_token_length).to(device) for t in self.comps.tokenizers]

    @torch.no_grad()
    def base_prediction(self, noisy, timesteps, input_ids, batch: dict, autocast=contextlib.nullcontext):
        """The base model's prediction and conditioning: UNet and text encoder(s) with every adapter disabled."""
        comps, family = self.comps, self.comps.family
        encoders = list(comps.text_encoders.values())
        with adapters_disabled(comps.denoiser, *encoders):
            cond = (self.text_cache(input_ids) if self.text_cache is not None  # offloaded encoders: not per step
                    else encode_anywhere(family, encoders, input_ids, self.cfg.text_encoder.clip_skip))
            pred = predict(family, comps.denoiser, noisy, timesteps, cond, batch, autocast)
        return pred, cond

    def __call__(self, denoiser, encoders, noisy, timesteps, batch: dict, step: int,
                 autocast=contextlib.nullcontext) -> torch.Tensor:
        prompts = self.prompts_for(step, noisy.shape[0])
        ids = self.token_ids(prompts, noisy.device)
        kept = {**batch, "captions": prompts}  # SDXL: the step's size conditioning, the preservation captions
        base, cond = self.base_prediction(noisy, timesteps, ids, kept, autocast)
        if self.cfg.text_encoder.train:  # the adapted text encoder, with gradient; a frozen one has no adapters
            cond = self.comps.family.encode(encoders, ids, self.cfg.text_encoder.clip_skip)
        adapted = predict(self.comps.family, denoiser, noisy, timesteps, cond, kept, autocast)
        return preservation_loss(adapted, base)


def make_preservation(cfg, comps, data, process_index: int = 0, num_processes: int = 1,
                      text_cache=None) -> Preservation | None:
    if cfg.reg.preservation.weight == 0:
        return None  # nothing drawn, nothing run: training is what it was without the option
    return Preservation(cfg, comps, preservation_prompts(cfg, data.samples), process_index, num_processes, text_cache)
