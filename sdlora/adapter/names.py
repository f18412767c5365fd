"""Canonical module names, independent of library versions: `<part>.<module path>`, the part being one of a
family's adaptable parts (model/parts.py: `unet`, `text_encoder`, SDXL's `text_encoder_2`), without the part's
model level (`text_model.`: transformers 4 has it, transformers 5 dropped it from CLIPTextModel and kept it in
CLIPTextModelWithProjection).

A name is read without its family at hand (files carry no model), so the parts are those of every family; a part
name means one thing in every family that has it (its role and model level)."""

from __future__ import annotations

from sdlora.model.families import FAMILIES


def _adaptable_parts() -> dict:
    parts = {}
    for family in FAMILIES.values():
        for part in family.parts:
            if part.adaptable:
                known = parts.setdefault(part.name, part)
                if (known.role, known.model_level) != (part.role, part.model_level):
                    raise AssertionError(f"part {part.name} has two roles or model levels across families")
    return parts


PARTS = _adaptable_parts()  # adaptable part name -> its row (any family's: role and model level agree)
COMPONENTS = tuple(PARTS)  # the adaptable parts' names, as canonical names start
TEXT_ENCODERS = tuple(n for n, p in PARTS.items() if p.role == "text_encoder")


def canonical_name(component: str, module_path: str) -> str:
    """`("text_encoder", "text_model.encoder.layers.0...")` -> `text_encoder.encoder.layers.0...`."""
    return f"{component}.{module_path.removeprefix(PARTS[component].model_level)}"


def split_name(name: str) -> tuple[str, str]:
    """(part, module path) of a canonical name; a ValueError when it starts with no adaptable part's name."""
    component, _, path = name.partition(".")
    if component not in PARTS:
        raise ValueError(f"not a canonical module name: {name} (it starts with none of {', '.join(PARTS)})")
    return component, path


def model_level(component: str) -> str:
    """The level of a part's module paths that canonical names leave out and the native layout writes."""
    return PARTS[component].model_level
