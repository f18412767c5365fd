"""The base of every config section and the checks several sections share (config.py and its section modules)."""

from __future__ import annotations

import os
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict


def _home(value):
    return os.path.expanduser(value) if isinstance(value, str) else value


UserPath = Annotated[str, AfterValidator(_home)]  # every file or folder key: a leading ~ is the user's home


class Section(BaseModel):
    """The base of every config section: an unknown key is an error, assignments are checked, and NaN / ±inf in any
    float (a YAML .nan / .inf, --set optim.lr=inf) is refused as non-finite: it can never train."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def no_blank(prompts: list[str], key: str) -> None:
    for i, p in enumerate(prompts):
        if not p.strip():
            raise ValueError(f"{key}.{i} is blank (every prompt needs text)")
