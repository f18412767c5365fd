"""A frozen base stored in fewer bits (model.base_precision): every Linear and Conv2d weight of the denoiser and
the text encoders is kept as float8_e4m3fn (`fp8`) or as optimum-quanto's int8 / int4 tensors, and upcast to the
compute dtype one layer at a time, inside that layer's forward and again inside its backward.

- `fp8`: the weight cast to torch.float8_e4m3fn with no scale, as kohya's `--fp8_base` and ComfyUI's fp8 weight
  dtype store it (plain torch; 1 byte per weight; e4m3 keeps 3 mantissa bits, and weights below 2^-6 lose
  precision as subnormals).
- `int8`: optimum-quanto's symmetric int8 with one absmax scale per output channel (qint8, axis 0).
- `int4`: optimum-quanto's affine int4 (qint4, a scale and a shift per group of 128 input weights along each
  output row, or 64 / 32 where 128 does not divide the row; per output row where none does), as quanto's QLinear
  chooses.

Only the weights move: biases, norms, embeddings and the VAE stay in the compute dtype, and so do every adapter
tensor (factors, alphas, DoRA magnitudes, in fp32) and the optimiser state. The upcast copy is never kept for the
backward pass (`_UpcastLinear` / `_UpcastConv2d` save the stored weight and upcast it again), so at most one layer's
full-precision weight exists at a time beside the activations.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

BASE_PRECISIONS = ("full", "fp8", "int8", "int4")  # model.base_precision; full: the training dtype (no storage change)
LIBRARY = {"int8": "optimum.quanto", "int4": "optimum.quanto"}  # the formats that need the optional extra `quant`


def library_missing(precision: str) -> str | None:
    """The one-line refusal when `precision` needs a library that is not installed, else None."""
    module = LIBRARY.get(precision)
    if module and importlib.util.find_spec("optimum") is not None and importlib.util.find_spec(module) is not None:
        return None
    if module:
        return (f"model.base_precision: {precision} needs optimum-quanto, which is not installed "
                "(pip install 'sdlora[quant]'), or use fp8, which needs no library")
    return None


def dense_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` as a plain tensor in `dtype`: a quanto tensor dequantised, an fp8 one upcast, any other cast (the
    same tensor when it already has `dtype`). Shape: the weight's."""
    if getattr(weight, "qtype", None) is not None:  # an optimum-quanto QTensor
        return weight.dequantize().to(dtype)
    return weight.to(dtype)


def is_low_bit(weight: torch.Tensor) -> bool:
    return getattr(weight, "qtype", None) is not None or weight.dtype == torch.float8_e4m3fn


def stored_bytes(weight: torch.Tensor) -> int:
    """Bytes a weight takes in memory (a quanto tensor: its integer data, packed two to a byte for int4, plus its
    scales and shifts)."""
    if hasattr(type(weight), "__tensor_flatten__"):  # a tensor subclass made of plain tensors
        names, _ = weight.__tensor_flatten__()
        return sum(stored_bytes(getattr(weight, n)) for n in names)
    return weight.numel() * weight.element_size()


def _int4_group(k: int) -> int | None:
    for group in (128, 96, 64, 32):  # quanto's QLinear rule: 128, stepping down by 32 until it divides the row
        if k > group and k % group == 0:
            return group
    return None


@torch.no_grad()
def quantise(weight: torch.Tensor, precision: str) -> torch.Tensor:
    """The stored form of a frozen weight (out, in) or (out, in, kh, kw) in `precision` (fp8, int8, int4)."""
    if precision == "fp8":
        return weight.to(torch.float8_e4m3fn)
    from optimum.quanto import AbsmaxOptimizer, MaxOptimizer, qint4, qint8, quantize_weight

    w = weight.detach().flatten(1) if precision == "int4" else weight.detach()
    if precision == "int8":
        return quantize_weight(w, qtype=qint8, axis=0, scale=AbsmaxOptimizer()(w, qtype=qint8, axis=0))
    group = _int4_group(w.shape[1])
    scale, shift = MaxOptimizer()(w, qtype=qint4, axis=0, group_size=group)
    q = quantize_weight(w, qtype=qint4, axis=0, scale=scale, shift=shift, group_size=group, optimized=False)
    return _Reshaped(q, weight.shape) if weight.dim() != 2 else q


class _Reshaped:
    """An int4 conv kernel: quanto groups 2-d weights only, so the kernel is stored flattened to (out, in·kh·kw)."""

    qtype = "int4"

    def __init__(self, q, shape):
        self.q, self.shape = q, torch.Size(shape)
        self.dtype, self.device = q.dtype, q.device

    def dequantize(self):
        return self.q.dequantize().reshape(self.shape)

    def __tensor_flatten__(self):
        return ["q"], None

    def dim(self):
        return len(self.shape)


class _UpcastLinear(torch.autograd.Function):
    """y = x Wᵀ + b with W upcast from its stored form in the forward and again in the backward (only the stored,
    low-bit W is kept between them). The weight is frozen: no gradient reaches it."""

    @staticmethod
    def forward(ctx, x, bias, module, dtype):
        ctx.module, ctx.dtype = module, dtype
        return F.linear(x, dense_weight(module.weight, dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        w = dense_weight(ctx.module.weight, ctx.dtype)
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return (grad @ w if ctx.needs_input_grad[0] else None), grad_bias, None, None


class _UpcastConv2d(torch.autograd.Function):
    """F.conv2d with the kernel upcast from its stored form in the forward and again in the backward."""

    @staticmethod
    def forward(ctx, x, bias, module, dtype):
        ctx.module, ctx.dtype, ctx.x_shape = module, dtype, x.shape
        c = module
        return F.conv2d(x, dense_weight(c.weight, dtype), bias, c.stride, c.padding, c.dilation, c.groups)

    @staticmethod
    def backward(ctx, grad):
        c = ctx.module
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = dense_weight(c.weight, ctx.dtype)
            grad_x = torch.nn.grad.conv2d_input(ctx.x_shape, w, grad, c.stride, c.padding, c.dilation, c.groups)
        grad_bias = grad.sum((0, 2, 3)) if ctx.needs_input_grad[1] else None
        return grad_x, grad_bias, None, None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _LowBitMixin:
    """What a low-bit Linear / Conv2d adds: `stored_weight` (the low-bit tensor, a plain attribute rather than a
    parameter or buffer: nothing trains it, and `Module.to(dtype)` must not upcast it; it lives on the device it was
    stored on) read through `weight`, so code that reads a base layer's weight gets the stored form and calls
    `dense_weight` on it."""

    precision = "full"

    @property
    def weight(self):  # a copy given a full-precision "weight" parameter (training/fisher.py's merge) uses it
        p = self._parameters.get("weight")
        return p if p is not None else self.stored_weight

    def _store(self, precision: str) -> None:
        w = self._parameters.pop("weight")
        self.stored_weight = quantise(w.detach(), precision)
        self.precision = precision

    def _upcast_args(self, x):
        dtype = _compute_dtype(x)
        bias = self.bias.to(dtype) if self.bias is not None else None
        return x.to(dtype), bias, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "weight" in self._parameters:  # a copy given a full-precision weight (fisher's merge): the plain layer
            return super().forward(x)
        x, bias, dtype = self._upcast_args(x)
        with torch.autocast(x.device.type, enabled=False):
            return self._upcast.apply(x, bias, self, dtype)



class LowBitLinear(_LowBitMixin, nn.Linear):
    _upcast = _UpcastLinear


class LowBitConv2d(_LowBitMixin, nn.Conv2d):
    _upcast = _UpcastConv2d


def kept_in_compute_dtype(model: nn.Module) -> set[str]:
    """Module names (one part of a dotted path) whose weights stay in the compute dtype: a transformers model's
    `_keep_in_fp32_modules` and `_keep_in_fp32_modules_strict`."""
    return {name for attr in ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict")
            for name in (getattr(model, attr, None) or ())}


def store_low_bits(model: nn.Module, precision: str) -> int:
    """Store every Linear and Conv2d weight of `model` in `precision` (fp8, int8, int4), in place: each module's
    class becomes LowBitLinear / LowBitConv2d (still an nn.Linear / nn.Conv2d), its weight `stored_weight`.
    Modules a transformers model names in `_keep_in_fp32_modules` (T5's `wo`, which transformers keeps out of 8-bit
    quantisation, huggingface/transformers#20287, and whose input T5 casts to `wo.weight.dtype`) keep their weight.
    Returns the number of modules stored. Run it after the model has its device and compute dtype."""
    if precision == "full":
        return 0
    n, keep = 0, kept_in_compute_dtype(model)
    for name, module in model.named_modules():
        if isinstance(module, _LowBitMixin) or keep & set(name.split(".")):
            continue
        if type(module) is nn.Linear or type(module) is nn.Conv2d:  # subclasses (LoRA-compatible ones) are plain
            module.__class__ = LowBitLinear if isinstance(module, nn.Linear) else LowBitConv2d
            module._store(precision)
            n += 1
    return n
