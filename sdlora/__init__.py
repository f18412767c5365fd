"""sdlora: a Stable Diffusion LoRA trainer."""

__version__ = "0.1.0"
