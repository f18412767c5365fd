"""Training data: dataset sources, bad-data handling, aspect-ratio buckets, caption transforms, latent caches.

The trainer uses `build_training_data(cfg, comps, ...)` and the `TrainingData` it returns (batches,
state_dict/load_state_dict, latent_distribution). docs/data.md documents the options.
"""

__all__ = ["TrainingData", "build_training_data"]


def __getattr__(name: str):
    # Lazy: the config validates with sdlora.data.images and .buckets, and must not import torch to do so.
    if name in __all__:
        from sdlora.data import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
