"""The base of every config section and the checks several sections share (config.py and its section modules)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """The base of every config section: an unknown key is an error, assignments are checked."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def no_blank(prompts: list[str], key: str) -> None:
    for i, p in enumerate(prompts):
        if not p.strip():
            raise ValueError(f"{key}.{i} is blank (every prompt needs text)")
