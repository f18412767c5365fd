"""Putting the model on its device and dtype for training: frozen weights in the training dtype (or in fewer bits:
model.base_precision), adapter tensors in fp32, train/eval modes, and the memory options (gradient checkpointing,
channels_last, compile)."""

from __future__ import annotations

import torch

from sdlora.adapter.functional import row_norm
from sdlora.lora.dora import DoRAMixin
from sdlora.lora.layers import AdapterLayer
from sdlora.model.components import Components
from sdlora.model.low_bits import store_low_bits
from sdlora.util.dtypes import torch_dtype

WEIGHT_DTYPES = {name: torch_dtype(name) for name in ("no", "fp16", "bf16")}  # train.mixed_precision


def place_models(comps: Components, layers: dict[str, AdapterLayer], device, weight_dtype, cfg,
                 text_device=None) -> None:
    """Frozen weights in the training dtype; every adapter tensor (factors, alphas, the offset factors of the
    compensated/principal inits) stays fp32, copied across from its fp32 value, never through the training dtype.
    The text encoders go to `text_device` (training/offload.text_encoder_device: the CPU when frozen, cached and
    offloaded), default `device`."""
    comps.vae.requires_grad_(False)
    fp32 = {(name, key): t.detach().clone() for name, layer in layers.items() for key, t in layer.adapter_tensors().items()}
    encoders = list(comps.text_encoders.values())
    for model in (comps.denoiser, comps.vae):
        model.to(device=device, dtype=weight_dtype)
    for model in encoders:
        model.to(device=device if text_device is None else text_device, dtype=weight_dtype)
    with torch.no_grad():
        for (name, key), value in fp32.items():
            t = getattr(layers[name], key)
            if isinstance(t, torch.nn.Parameter):
                t.data = value.to(device=device, dtype=torch.float32)
            else:  # a buffer: Module.to replaced it
                setattr(layers[name], key, value.to(device=device, dtype=torch.float32))
    store_base(comps, layers, cfg)
    comps.vae.eval()
    for text_encoder in encoders:
        text_encoder.train(cfg.text_encoder.train)
    comps.denoiser.train()
    if cfg.train.gradient_checkpointing:  # non-reentrant checkpoints: gradients reach the LoRA factors inside
        comps.denoiser.enable_gradient_checkpointing()
        if cfg.text_encoder.train:
            for text_encoder in encoders:
                enable_activation_checkpointing(text_encoder)
    if cfg.train.channels_last:
        comps.denoiser.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        comps.denoiser.compile()  # in place: the module keeps its type, so hooks, DDP and export see the same object


def store_base(comps: Components, layers: dict[str, AdapterLayer], cfg) -> None:
    """model.base_precision: the frozen Linear / Conv2d weights of the denoiser and the text encoders stored in
    fp8 / int8 / int4 (model/low_bits.py), after the adapters are built on the full-precision weights. DoRA's
    magnitude then starts at the stored base's row norms, so that the output at step 0 is the stored base's
    (a magnitude read from lora.init_from is kept as the file has it)."""
    precision = cfg.model.base_precision
    if precision == "full":
        return
    for model in (comps.denoiser, *comps.text_encoders.values()):
        store_low_bits(model, precision)
    if cfg.lora.init_from is None:
        with torch.no_grad():
            for layer in layers.values():
                if isinstance(layer, DoRAMixin):
                    layer.magnitude.copy_(row_norm(layer.original_weight()).float())


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing of a transformers model: transformers 5's
    `activation_checkpointing_enable` where it exists (the old `gradient_checkpointing_enable` warns and goes in
    v6), else the old name (transformers 4)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
