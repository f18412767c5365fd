"""The maths of each adapter kind on plain tensors, shared by the training layers (lora/layers.py) and the exported
records (adapter/weights.py), so the two cannot disagree.

- LoRA: W = W0 + up @ down (every scale folded into `up`).
- DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"): W = m ⊙ V / ‖V‖, V = W0 + up @ down, with
  ‖V‖ the L2 norm of each output feature's weights (a row of the (out, in·kh·kw) matrix; the paper's column norm
  of its (in, out) weight, peft's `weight_norm`). In training the norm is treated as a constant (detached), as the
  paper (section 4.3) recommends and peft does: the gradient reaches V only through the numerator.
"""

from __future__ import annotations

import torch


def row_norm(w: torch.Tensor) -> torch.Tensor:
    """‖w_i‖ for each output feature i of an (out, ...) weight: shape (out,)."""
    return torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1)


def per_output(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-output vector (out,) shaped to broadcast over a weight `like` of shape (out, ...)."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def dora_weight(w0: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, *, detach_norm: bool = True) -> torch.Tensor:
    """m ⊙ (W0 + ΔW) / ‖W0 + ΔW‖ per output feature, in the dtype of the inputs. `detach_norm`: the norm carries no
    gradient (the paper's and peft's training rule); without gradients it changes nothing."""
    v = w0 + delta
    norm = row_norm(v)
    if detach_norm:
        norm = norm.detach()
    return v * per_output(magnitude / norm, v)
