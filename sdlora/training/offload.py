"""Frozen text encoders kept off the training device (text_encoder.offload).

When every text encoder of the run is frozen and its outputs are cached (training/text_cache.py), the step never
runs them: each caption is encoded once, at its first cache miss. Keeping them on the training device then costs
their whole size for nothing (SD3.5's T5-XXL: 4.7 B parameters, 8.8 GiB in bf16). Offloaded, they stay on the CPU:
a cache miss encodes there and the outputs move to the training device (`encode_anywhere`); the pipelines that
need them beside the denoiser (samples, the Fisher estimate's prompt examples) move them over for the call and
back after (`encoders_on`). Peers: diffusers' train_dreambooth_lora_sd3.py precomputes the prompt embeddings and
deletes the encoders; kohya's --cache_text_encoder_outputs moves them to the CPU.
"""

from __future__ import annotations

import contextlib

import torch

OFFLOAD_DEVICE = torch.device("cpu")


def text_encoder_device(cfg, device, offload_device=OFFLOAD_DEVICE) -> torch.device:
    """Where the run keeps its text encoders: `offload_device` when text_encoder.offload is on, else the training
    `device`. "auto" is on when the encoders are frozen (text_encoder.train off), their outputs cached
    (data.cache_text_encoder_outputs) and `device` is not `offload_device` itself; `true` offloads whenever the
    encoders are frozen and cached; neither (a trained or uncached encoder runs every step) keeps them on `device` (a
    set offload with no effect is reported at start: config_effects.py). `device`s are compared by type."""
    device, offload_device = torch.device(device), torch.device(offload_device)
    frozen_and_cached = not cfg.text_encoder.train and cfg.data.cache_text_encoder_outputs
    choice = cfg.text_encoder.offload
    if not frozen_and_cached or choice is False or (choice == "auto" and device.type == offload_device.type):
        return device
    return offload_device


def model_device(model) -> torch.device:
    """The device of `model`'s first parameter (a data-parallel wrapper's module's)."""
    return next(getattr(model, "module", model).parameters()).device


def to_device(conditioning, device):
    """A family's conditioning (a tensor, or SDXL's / SD3's conditioning object: `.to`) on `device`."""
    return conditioning.to(device)


def encode_anywhere(family, text_encoders, input_ids, clip_skip: int = 1):
    """`family.encode(text_encoders, input_ids, clip_skip)` run on the encoders' device (the offload device when
    they are offloaded), its result on the device of `input_ids` (one tensor, or a list of one per encoder)."""
    encoders = list(text_encoders) if isinstance(text_encoders, (list, tuple)) else [text_encoders]
    ids = list(input_ids) if isinstance(input_ids, (list, tuple)) else [input_ids]
    there = model_device(encoders[0])
    if ids[0].device == there:
        return family.encode(text_encoders, input_ids, clip_skip)
    moved = [i.to(there) for i in ids] if isinstance(input_ids, (list, tuple)) else input_ids.to(there)
    return to_device(family.encode(text_encoders, moved, clip_skip), ids[0].device)


@contextlib.contextmanager
def encoders_on(text_encoders, device):
    """Offloaded encoders on `device` for the block (a pipeline call), back where each was after it; encoders
    already on `device` are not moved."""
    encoders = list(text_encoders.values()) if isinstance(text_encoders, dict) else list(text_encoders)
    homes = [model_device(e) for e in encoders]
    moved = [e for e, home in zip(encoders, homes) if home != torch.device(device)]
    for e in moved:
        e.to(device)
    try:
        yield
    finally:
        for e, home in zip(encoders, homes):
            if e in moved:
                e.to(home)
