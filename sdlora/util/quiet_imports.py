"""Silence one import-time warning that says nothing to an sdlora user.

transformers (5.x) warns once per image-processor class, when diffusers' pipeline modules are imported, that
torchvision is not installed and it falls back to the PIL image processor. sdlora never uses torchvision (the project
installs without it, and no image processor runs in training or sampling), so every `sdlora demo`, sampled `train`
or merged `export` printed two such lines. The filter drops exactly that message, on the one logger that emits it;
every other transformers warning is untouched.
"""

from __future__ import annotations

import logging

TORCHVISION_FALLBACK = "requires torchvision (not installed); falling back to"
LOGGER = "transformers.utils.import_utils"


def _not_torchvision_fallback(record: logging.LogRecord) -> bool:
    return TORCHVISION_FALLBACK not in record.getMessage()


def silence_torchvision_fallback_warning() -> None:
    """Idempotent: the filter is added once."""
    logger = logging.getLogger(LOGGER)
    if _not_torchvision_fallback not in logger.filters:
        logger.addFilter(_not_torchvision_fallback)
