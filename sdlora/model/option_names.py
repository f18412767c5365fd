"""How the command in use names the configs folder of a single-file model (no torch here: cli.py imports it).

Training names it by the config key `model.config_dir`; export, merge, resize and extract by their `--config-dir`
option. cli.py sets the name for the command it runs; the single-file readers' hints say `config_dir_hint()`.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager

CONFIG_DIR_OPTION = contextvars.ContextVar("config_dir_option", default="model.config_dir")


@contextmanager
def config_dir_named(option: str):
    """Within the block, single-file errors tell the user to set `option` (e.g. "--config-dir")."""
    token = CONFIG_DIR_OPTION.set(option)
    try:
        yield
    finally:
        CONFIG_DIR_OPTION.reset(token)


def config_dir_hint(what: str = "that architecture") -> str:
    """`set <option> to a diffusers folder of <what>`, the option named as the command in use names it."""
    return f"set {CONFIG_DIR_OPTION.get()} to a diffusers folder of {what}"
