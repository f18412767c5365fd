"""Exported adapter weights: the data model, native (diffusers) and kohya layouts, merging into a model."""
