"""The pieces the option table is made of: a row of the report, the kinds of rule, and value readers.

A rule turns one kohya option's value into sdlora keys (written into a `Builder`) and returns what the report
says about it. Values come as kohya writes them (TOML numbers and booleans) or as the GUI does (numbers as
strings, "" for unset), so every reader accepts both and raises `Invalid` (a table row, not a traceback) for
anything else.

sdlora.onetrainer_import builds its table from the same rules and rows (`who` names the trainer in their texts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

# What a row says about an option. Every option of the input gets exactly one row.
MAPPED = "mapped"
DEFAULT = "kohya default"  # not in the input; kohya's default differs from sdlora's, so it is written explicitly
OFF = "off"  # unset, or a value that turns the option off: nothing to carry over
NO_EFFECT = "no effect"  # changes how kohya runs (memory, speed, launch, logging), not what it trains
UNSUPPORTED = "NOT SUPPORTED"  # in effect in kohya; sdlora has nothing that does it: the run will differ here
INVALID = "invalid value"
UNKNOWN = "unknown option"


@dataclass
class Row:
    option: str  # as the input names it (GUI key, `network_args.conv_dim`, `datasets.0.subsets.1.num_repeats`)
    value: Any
    status: str
    detail: str  # the sdlora key(s) it became, or why not


class Invalid(ValueError):
    """An option's value cannot be read as what kohya expects (e.g. `network_dim = "abc"`)."""


class Unmappable(ValueError):
    """An option is on, with a value sdlora cannot reproduce; the message says why (a NOT SUPPORTED row)."""


@dataclass
class Builder:
    """The sdlora config being built (nested dict by dotted keys), plus what later rules need to know."""

    data: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)  # every kohya option of the input (kohya names), for rules that look
    notes: list = field(default_factory=list)  # lines printed after the table
    state: dict = field(default_factory=dict)  # what one rule leaves for the end (network.finish): conv_dim, ratios...

    def set(self, key: str, value) -> str:
        node = self.data
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
        return key

    def get(self, key: str, default=None):
        node = self.data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node


# ----------------------------------------------------------------------------------------------- readers
def is_unset(value) -> bool:
    """The GUI writes "" (and JSON null) for a field left empty: kohya then uses its default."""
    return value is None or (isinstance(value, str) and not value.strip())


def as_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise Invalid(f"{value!r} is not true or false")


def as_float(value) -> float:
    if isinstance(value, bool):
        raise Invalid(f"{value!r} is not a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise Invalid(f"{value!r} is not a number") from None


def as_int(value) -> int:
    number = as_float(value)
    if number != int(number):
        raise Invalid(f"{value!r} is not a whole number")
    return int(number)


def as_str(value) -> str:
    if isinstance(value, (dict, list)):
        raise Invalid(f"{value!r} is not text")
    return str(value)


def as_list(value) -> list:
    """kohya's list options (network_args, optimizer_args) as a TOML list or the GUI's space-separated string."""
    if isinstance(value, list):
        return [as_str(v) for v in value]
    return as_str(value).replace('"', "").split()


def key_values(items: list[str], option: str) -> list[tuple[str, str]]:
    """`["conv_dim=4", "algo=locon"]` -> [("conv_dim", "4"), ...]; a piece without `=` is Invalid."""
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise Invalid(f"{option}: {item!r} is not key=value")
        pairs.append((key.strip(), value.strip().strip("'\"")))
    return pairs


# --------------------------------------------------------------------------------------------- rule kinds
Convert = Callable[[Any, Builder], tuple[str, str]]  # (value, builder) -> (status, detail)


@dataclass(frozen=True)
class To:
    """The option is one sdlora key: `key = read(value)`. `off`: values that mean "off" in kohya (nothing written)."""

    key: str
    read: Callable = lambda v: v
    off: tuple = ()
    note: str = ""
    who: str = "kohya"  # the trainer whose options these are (sdlora.onetrainer_import uses the same rules)

    def __call__(self, value, b: Builder) -> tuple[str, str]:
        if self.off and value in self.off:
            return OFF, f"{value!r} is off in {self.who}"
        b.set(self.key, self.read(value))
        return MAPPED, self.key + (f" ({self.note})" if self.note else "")


@dataclass(frozen=True)
class NoEffect:
    """The option changes how kohya runs, not what it trains (memory, speed, launching, hub uploads)."""

    why: str

    def __call__(self, value, b: Builder) -> tuple[str, str]:
        return NO_EFFECT, self.why


@dataclass(frozen=True)
class Unsupported:
    """sdlora has nothing that does this. A value in `off` (or false / empty) is reported as off, not as a gap."""

    why: str
    off: tuple = ()
    who: str = "kohya"

    def __call__(self, value, b: Builder) -> tuple[str, str]:
        if value is False or value in self.off or (isinstance(value, (list, dict)) and not value):
            return OFF, f"{value!r} is {self.who}'s default or off"
        return UNSUPPORTED, self.why


@dataclass(frozen=True)
class Custom:
    """A converter that needs more than one key, or other options (`b.options`); it returns (status, detail) and
    raises Invalid / Unmappable for a value it cannot carry."""

    fn: Convert
    target: str = ""  # for docs: the sdlora key(s) it writes

    def __call__(self, value, b: Builder) -> tuple[str, str]:
        return self.fn(value, b)


def apply(rule, option: str, value, b: Builder) -> Row:
    """One option through its rule, as a row (a reading problem is an INVALID row, a gap an UNSUPPORTED one)."""
    try:
        status, detail = rule(value, b)
    except Invalid as e:
        return Row(option, value, INVALID, f"not imported: {e}")
    except Unmappable as e:
        return Row(option, value, UNSUPPORTED, str(e))
    return Row(option, value, status, detail)
