"""The guard every writer of trained tensors calls: nothing non-finite reaches a file."""

from __future__ import annotations

import torch

from sdlora.errors import NonFiniteWeights


def require_finite(tensors: dict, path) -> None:
    """Refuse to write non-finite tensors: every writer of trained tensors calls this before writing `path`.
    Raises NonFiniteWeights (one line naming the file and the tensor, exit 3)."""
    for key, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteWeights(f"refusing to write {path}: {key} holds non-finite values (NaN/inf); "
                                   "nothing was written")
