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


# ------------------------------------------------------------------------------------------- LyCORIS kinds
# LoHa (Hyeon-Woo et al. 2022, "FedPara", as LyCORIS applies it): ΔW = (w1a @ w1b) ⊙ (w2a @ w2b), each pair of rank r;
# the Hadamard product of two rank-r matrices has rank up to r². LoKr (LyCORIS): ΔW = w1 ⊗ w2 (Kronecker product),
# w1 (a, c) and w2 (b, d) with out = a·b, in = c·d; w2 (and, optionally, w1) may itself be a rank-r product. A conv
# weight (out, in, kh, kw) is handled flattened to (out, in·kh·kw), LyCORIS' non-Tucker conv form: LoHa's w1b/w2b and
# LoKr's w2b are (r, in·kh·kw), a full LoKr w2 is (b, d, kh, kw). The scale (alpha / r, learned or fixed) multiplies
# the whole product.


def hadamard_product(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor) -> torch.Tensor:
    """(w1a @ w1b) ⊙ (w2a @ w2b) as an (out, in·kh·kw) matrix: LoHa's update before its scale."""
    return (w1a @ w1b.flatten(1)) * (w2a @ w2b.flatten(1))


def kronecker_product(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """w1 ⊗ w2 as an (a·b, c·d·kh·kw) matrix: LoKr's update before its scale. w1 is (a, c); w2 is (b, d), or a conv
    factor (b, d, kh, kw) / (b, d·kh·kw); reshaped to (out, in, kh, kw) this is LyCORIS' kron of w1[..., None, None]
    with the 4-d w2."""
    return torch.kron(w1, w2.flatten(1))


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS' split of a dimension into (m, n), m <= n, m · n = dimension: with factor > 0 dividing it, (factor,
    dimension / factor) in order; otherwise the divisor pair closest to square whose smaller part is <= factor (any
    size for -1). 128 -> (8, 16); with factor 4, (4, 32); a prime 127 -> (1, 127). LoKr gives m to w1, n to w2."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:  # step through the divisors up to (just past) the square root; the last pair kept wins
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (m, n) if m <= n else (n, m)
