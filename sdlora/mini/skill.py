"""What a model draws, scored by the judge: fixed seeds, DDIM, classifier-free guidance."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from sdlora.mini.data import BACKGROUNDS, CONCEPT, DIGIT_WORDS, HELD_OUT, STROKES, TRIGGER, caption
from sdlora.mini.judge import Judge

SAMPLE_STEPS = 25
GUIDANCE = 4.0


def load_pipeline(model_dir: str | Path):
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from sdlora.model.loading import _quiet_loaders

    _quiet_loaders()
    with warnings.catch_warnings():  # newer diffusers renamed torch_dtype to dtype; older ones know only torch_dtype
        warnings.simplefilter("ignore")
        pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), torch_dtype=torch.float32, safety_checker=None,
                                                       requires_safety_checker=False, local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, prompts: list[str], seeds: list[int], *, steps: int = SAMPLE_STEPS, guidance: float = GUIDANCE,
           chunk: int = 64) -> list[np.ndarray]:
    """One image per (prompt, seed) pair, each from its own generator, so a batch's size changes nothing."""
    import torch

    out: list[np.ndarray] = []
    for i in range(0, len(prompts), chunk):
        p, s = prompts[i:i + chunk], seeds[i:i + chunk]
        gens = [torch.Generator().manual_seed(int(k)) for k in s]
        with torch.no_grad():
            imgs = pipe(p, num_inference_steps=steps, guidance_scale=guidance, height=32, width=32,
                        generator=gens, output_type="np").images
        out.extend((np.clip(imgs, 0, 1) * 255).round().astype(np.uint8))
    return out


def digit_cases(held_out: bool, seeds_per_case: int, first_seed: int = 0, backgrounds=None):
    """(prompts, seeds, (label, stroke, background) per image) for the training or the held-out combinations."""
    prompts, seeds, truth = [], [], []
    for stroke in STROKES:
        for label in range(len(DIGIT_WORDS)):
            if ((stroke, label) in HELD_OUT) != held_out:
                continue
            for bg in backgrounds or BACKGROUNDS:
                for k in range(seeds_per_case):
                    prompts.append(caption(stroke, label, bg))
                    seeds.append(first_seed + len(seeds))
                    truth.append((label, stroke, bg))
    return prompts, seeds, truth


def concept_cases(seeds_per_case: int, first_seed: int = 0, concept: int = CONCEPT):
    """(prompts, seeds, truth) for a new concept (the star, or data.CONCEPT_2) in every colour pair."""
    prompts, seeds, truth = [], [], []
    for stroke in STROKES:
        for bg in BACKGROUNDS:
            for k in range(seeds_per_case):
                prompts.append(caption(stroke, concept, bg))
                seeds.append(first_seed + len(seeds))
                truth.append((concept, stroke, bg))
    return prompts, seeds, truth


def score(judge: Judge, images, truth) -> dict:
    """Shape (digit or glyph) right, colours (stroke and background both) right, as fractions of the images."""
    v = judge(images)
    shape = [int(lab) == t[0] for lab, t in zip(v.labels, truth)]
    stroke = [s == t[1] for s, t in zip(v.strokes, truth)]
    colour = [s == t[1] and b == t[2] for s, b, t in zip(v.strokes, v.backgrounds, truth)]
    return {"shape": float(np.mean(shape)), "stroke": float(np.mean(stroke)), "colour": float(np.mean(colour)),
            "n": len(truth), "labels": [int(x) for x in v.labels]}


def skill_table(pipe, judge: Judge, *, seeds_train: int = 2, seeds_held_out: int = 6) -> dict:
    rows = {}
    for name, held_out, n in (("training combinations", False, seeds_train), ("held-out combinations", True, seeds_held_out)):
        prompts, seeds, truth = digit_cases(held_out, n, first_seed=1000)
        rows[name] = score(judge, sample(pipe, prompts, seeds), truth)
    return rows


__all__ = ["load_pipeline", "sample", "digit_cases", "concept_cases", "score", "skill_table", "TRIGGER"]


def paired_distance(images: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """How far samples moved from the reference samples drawn at the same prompts and seeds: the RMS difference of
    pixel values (uint8 images, scaled to [0, 1]) of each pair, averaged over the pairs. 0: identical; a judge-free
    measure of what the rest of the model kept (issue 30). ValueError where the lists or image shapes differ."""
    if len(images) != len(reference) or not images:
        raise ValueError(f"paired_distance: {len(images)} images against {len(reference)} reference images")
    rms = []
    for a, b in zip(images, reference):
        if a.shape != b.shape:
            raise ValueError(f"paired_distance: image of shape {a.shape} against {b.shape}")
        d = (a.astype(np.float64) - b.astype(np.float64)) / 255.0
        rms.append(float(np.sqrt(np.mean(d * d))))
    return float(np.mean(rms))
