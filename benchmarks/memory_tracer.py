"""The fake-tensor memory tracer shared by benchmarks/sdxl_memory.py, sd3_memory.py and memory_grid.py: a
MemTracker that counts frozen and low-bit weights, CUDA autocast's float32 policy for the norms on CPU, fake
parameters that `Module.to` can convert, bitsandbytes' 8-bit AdamW state counted, and the GPU assumptions
(method and assumptions: docs/sdxl-memory.md)."""

from __future__ import annotations

import contextlib
import types
from collections import Counter

import torch
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
from torch.utils._python_dispatch import TorchDispatchMode

GIB = 2 ** 30
CUDA_CONTEXT_GIB = 0.5  # assumption: CUDA context and kernels, outside PyTorch's allocator
FRAGMENTATION = 0.10  # assumption: the caching allocator's overhead on the allocated peak
CARD_GIB = 15.6  # a "16 GB" card: 16 GiB of memory, of which nvidia-smi typically reports 15.6-16.0 GiB usable
BNB_BLOCK, BNB_MIN_8BIT_SIZE = 256, 4096  # bitsandbytes' 8-bit optimiser block size and min_8bit_size default
CATEGORIES = {"Parameter": "parameters", "Buffer": "buffers", "Gradient": "gradients", "Activation": "activations",
              "Temp": "backward temporaries", "Optstate": "optimiser state", "Other": "inputs"}


def compute_dtype(cfg) -> torch.dtype:
    """The frozen weights' and the autocast region's dtype: bf16 under train.mixed_precision bf16, else float32."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.mixed_precision, torch.float32)


# ---- the tracker and the fake-tensor plumbing


class _NoHook:
    @staticmethod
    def remove() -> None:
        pass


class StepMemTracker(MemTracker):
    """MemTracker for a model with frozen parameters, keeping the global peak only.

    MemTracker registers a gradient hook on every parameter of every module it sees run, and torch refuses a hook on
    a tensor that does not require grad: frozen parameters get a no-op handle instead (they never get a gradient).
    It also refreshes every active module's own peak at every op (modules x ops: over 20 minutes for SDXL's step on
    one core); the peak by category over the whole run, the only number read here, is kept exactly as the base
    class keeps it."""

    def _track_module_params_and_buffers(self, module, install_grad_hooks: bool = True):
        for p in module.parameters():
            if not p.requires_grad and p not in self._param_to_grad_hook_handles:
                self._param_to_grad_hook_handles[p] = (_NoHook, _NoHook)
        for m in module.modules():  # a low-bit base's weights (model/low_bits.py): frozen parameters in all but name
            if (w := getattr(m, "stored_weight", None)) is not None:
                for t in plain_tensors(w):
                    self._update_and_maybe_create_winfos(t, _MemRefType.PARAM)
        return super()._track_module_params_and_buffers(module, install_grad_hooks)

    peak_phase = "none"

    def __init__(self):
        super().__init__()
        # forward / backward / optimiser step -> bytes by category at the phase's own peak
        self.phase_peaks: dict[str, dict[str, int]] = {}

    def _update_peak_stats(self, peak_state) -> None:
        phase = "optimiser step" if self._in_opt else "backward" if self._mod_tracker.is_bw else "forward"
        total = sum(snap["Total"] for snap in self._curr_mem_snap.values())
        if total > self.phase_peaks.get(phase, {}).get("total", -1):
            self.phase_peaks[phase] = categories(self._curr_mem_snap)
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap["Total"]:
                self._peak_mem[dev] = snap["Total"]
                self._peak_mem_snap[dev] = dict(snap)
                self.peak_phase = phase

    def total(self, kind: str = "current") -> int:
        return sum(s["Total"] for s in self.get_tracker_snapshot(kind).values())

    def by_category(self, kind: str = "peak") -> dict[str, int]:
        return categories(self.get_tracker_snapshot(kind))


def plain_tensors(w) -> list[torch.Tensor]:
    """The plain tensors holding a stored weight (an optimum-quanto tensor: its data, packed for int4, scales and
    shifts)."""
    if not hasattr(type(w), "__tensor_flatten__"):
        return [w]
    names, _ = w.__tensor_flatten__()
    return [t for n in names for t in plain_tensors(getattr(w, n))]


def categories(snapshot: dict) -> dict[str, int]:
    """A MemTracker snapshot (device -> category -> bytes) summed over devices, with this script's names."""
    out = Counter()
    for snap in snapshot.values():
        for k, v in snap.items():
            out[CATEGORIES.get(getattr(k, "value", k), "total")] += v
    return dict(out)


class OpCounter(TorchDispatchMode):
    """How often each aten op ran (to show which attention kernel the step used)."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def cuda_fp32_norms():
    """CUDA autocast's float32 policy for the normalisations, on CPU. Under CUDA autocast group_norm and layer_norm
    cast their floating inputs to float32 and return float32 (torch's AMP reference, "CUDA Ops that can autocast to
    float32"); CPU autocast keeps a bf16 input in bf16. SDXL's GroupNorm and LayerNorm modules call
    `torch.nn.functional.group_norm` / `layer_norm`, which are wrapped here while autocast is on, so the traced
    activations get CUDA's dtypes. Wrapping the functions (not a TorchFunctionMode, which the checkpoints'
    recomputation in backward does not see) keeps forward and recomputation alike. The other ops on CUDA's float32
    list (softmax, pow, exp, the losses...) run on float32 inputs in this step already or inside the attention
    kernel."""
    F = torch.nn.functional
    originals = {name: getattr(F, name) for name in ("group_norm", "layer_norm")}

    def up(t):
        return t.float() if isinstance(t, torch.Tensor) and t.dtype in (torch.bfloat16, torch.float16) else t

    def fp32(fn):
        def run(*args, **kwargs):
            if torch.is_autocast_enabled("cpu"):
                args, kwargs = [up(a) for a in args], {k: up(v) for k, v in kwargs.items()}
            return fn(*args, **kwargs)
        return run

    for name, fn in originals.items():
        setattr(F, name, fp32(fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(F, name, fn)


@contextlib.contextmanager
def fake_module_conversion(fake: bool):
    """Let `Module.to` convert fake parameters. It swaps each fake parameter for its converted copy
    (torch.utils.swap_tensors), which refuses tensors with weak references, and FakeTensorMode's converter memo keeps
    one on every fake tensor it makes. The memo is for turning real tensors into fake ones, which this script never
    asks it to do again, so the check is lifted while the model is placed."""
    if not fake:
        yield
        return
    original = torch.utils.weakref
    torch.utils.weakref = types.SimpleNamespace(getweakrefs=lambda t: [])
    try:
        yield
    finally:
        torch.utils.weakref = original


# ---- counted parts and the GPU assumptions


def adam8bit_bytes(trained: list[tuple[int, int]]) -> int:
    """bitsandbytes AdamW8bit's state: per moment 1 byte per value plus a fp32 absmax per 256-value block; tensors
    under min_8bit_size values keep two fp32 moments."""
    total = 0
    for n, _ in trained:
        total += 2 * (n + 4 * -(-n // BNB_BLOCK)) if n >= BNB_MIN_8BIT_SIZE else 8 * n
    return total


def on_gpu(allocated: int) -> float:
    return allocated * (1 + FRAGMENTATION) + CUDA_CONTEXT_GIB * GIB


def gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def with_adam8bit(run: dict) -> int:
    """The step's peak with bitsandbytes' 8-bit state in place of AdamW's: at each phase's peak, the optimiser
    category (AdamW's moments, and in the optimiser step its foreach temporaries) is replaced by the counted 8-bit
    state, and the largest phase wins."""
    return max(p["total"] - p.get("optimiser state", 0) + adam8bit_bytes(run["trained"])
               for p in run["phase_peaks"].values())
