"""sdlora: a Stable Diffusion LoRA trainer."""

__version__ = "0.1.0"

from sdlora.util.quiet_imports import silence_torchvision_fallback_warning  # noqa: E402

silence_torchvision_fallback_warning()
