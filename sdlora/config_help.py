"""How the config schema speaks to users: the one-line message of a validation error (the key path, what is wrong,
the allowed keys of an unknown one) and the reference `sdlora config-help` prints (every key, its default, its
choices, its description). The schema itself is config.py's."""

from __future__ import annotations

import json
import typing
from typing import Any

from pydantic import BaseModel


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """The keys allowed at `loc`'s parent, for the unknown-key message."""
    cls: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part) if hasattr(cls, "model_fields") else None
        if field is None:
            return None
        ann = field.annotation
        args = getattr(ann, "__args__", ()) or ()
        cands = [ann, *args] + [a for x in args for a in (getattr(x, "__args__", ()) or ())]
        nxt = next((c for c in cands if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return None
        cls = nxt
    return sorted(cls.model_fields)


def describe_error(schema: type[BaseModel], err: dict) -> str:
    """One line for a pydantic error: the key path, what is wrong, and for an unknown key the allowed ones."""
    loc = ".".join(str(p) for p in err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(schema, err["loc"])
        hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
        return f"{loc}: unknown key{hint}"
    if kind == "missing":
        return f"{loc}: required key is missing"
    msg = err["msg"]
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
        return f"{loc}: {msg}" if loc and not msg.startswith(loc + ".") else msg
    value = err.get("input")
    shown = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    return f"{loc}: got {shown}, {msg[0].lower() + msg[1:]}"


def _literal_choices(annotation) -> tuple:
    """The allowed values of a Literal annotation (also inside Optional[...] / a union); () for any other type."""
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    return tuple(v for arg in typing.get_args(annotation) for v in _literal_choices(arg))


def describe_model(model: type[BaseModel], prefix: str = "") -> str:
    """Every key with its type default and description (the reference `sdlora config-help` prints)."""
    lines = []
    for name, f in model.model_fields.items():
        path = f"{prefix}{name}"
        ann = f.annotation
        sub = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if sub is not None:
            lines.append(describe_model(sub, path + "."))
            continue
        default = "required" if f.is_required() else repr(f.get_default(call_default_factory=True))
        choices = _literal_choices(ann)
        allowed = f"  (one of: {', '.join(map(str, choices))})" if choices else ""
        lines.append(f"{path} = {default}{allowed}\n    {f.description or ''}")
    return "\n".join(lines)
