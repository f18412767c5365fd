"""Reading a config file (YAML / TOML / JSON) and `--set key.path=value` overrides into a plain dict, with one-line
errors that name the file, line, column and cause. Validation against the schema is config.py's."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import yaml

from sdlora.errors import UserError


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one section (first at line {seen[key] + 1})",
                    key_node.start_mark)
            try:
                seen[key] = key_node.start_mark.line
            except TypeError:  # an unhashable key: let the base class report it
                break
        return super().construct_mapping(node, deep=deep)


def _yaml_error(e: yaml.YAMLError) -> str:
    """`line L, column C: <cause> (<context>)` from a PyYAML error (its str() is several lines)."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
    context = getattr(e, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    hint = ""
    if "'\\t'" in problem:
        hint = " (YAML indents with spaces, not tabs)"
    return f"{where}{problem}" + (f" ({context})" if context else "") + hint


def read_config_file(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        text = p.read_bytes()
    except OSError as e:
        raise UserError(f"config file {p} cannot be read: {e.strerror or type(e).__name__}") from None
    suffix = p.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise UserError(f"config file {p}: unknown extension {p.suffix!r} (allowed: .yaml, .yml, .toml, .json)")
    try:
        decoded = text.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"config file {p} does not parse: not UTF-8 (byte {e.start})") from None
    try:
        if suffix == ".toml":
            data = tomllib.loads(decoded)  # its message ends "(at line L, column C)"
        else:
            data = yaml.load(decoded, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {p} does not parse at {_yaml_error(e)}") from None
    except tomllib.TOMLDecodeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"config file {p} does not parse: {first}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {p}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], value parsed as YAML, so 1e-4, true, [a, b] work)."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected key.path=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise UserError(f"--set {item!r}: bad key path {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides or []:
        parts, value = parse_override(item)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"--set {item!r}: {'.'.join(parts[:i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return data
