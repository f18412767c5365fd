"""Canonical module names, independent of library versions: `unet.<module path>`, `text_encoder.<module path>` and
(SDXL) `text_encoder_2.<module path>`, without the `text_model.` level that transformers 4 has (and transformers 5
dropped from CLIPTextModel but kept in CLIPTextModelWithProjection)."""

from __future__ import annotations

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def canonical_name(component: str, module_path: str) -> str:
    """`("text_encoder", "text_model.encoder.layers.0...")` -> `text_encoder.encoder.layers.0...`."""
    if component in TEXT_ENCODERS:
        module_path = module_path.removeprefix("text_model.")
    return f"{component}.{module_path}"


def split_name(name: str) -> tuple[str, str]:
    component, _, path = name.partition(".")
    if component not in COMPONENTS:
        raise ValueError(f"not a canonical module name: {name}")
    return component, path
