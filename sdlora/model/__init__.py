"""Base models: loading (diffusers folders, single-file checkpoints and their LDM keys), text conditioning, tiny models."""
