"""Training data: dataset sources, bad-data handling, aspect-ratio buckets, caption transforms, latent caches.

The trainer uses `build_training_data(cfg, comps, ...)` and the `TrainingData` it returns (batches,
state_dict/load_state_dict, latent_distribution). docs/data.md documents the options.
"""

from .pipeline import TrainingData, build_training_data

__all__ = ["TrainingData", "build_training_data"]
