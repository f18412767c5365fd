"""An exponential moving average of the adapter weights (train.ema), exported beside the raw adapter.

After every optimiser step t (counted from 1, skipped non-finite steps included, as the LR schedule counts):

    t <  start_step:  ema = w_t                                   (follow the weights until the average starts)
    t >= start_step:  ema = decay · ema + (1 − decay) · w_t

over every trained adapter tensor (A, B, a learnable alpha; frozen ones such as offset factors or a fixed
alpha are copied, so d·c + (1 − d)·c rounding never moves a constant), in fp32,
on the training device or the CPU. It costs one copy of the adapter (a few MB for a LoRA) and a fused
multiply-add per step. `average()` is what the exporter writes as adapter_ema.safetensors. The state is saved in
each checkpoint (ema.safetensors) and restored with it, so a resumed run's average is bit-identical to an
uninterrupted one's.
"""

from __future__ import annotations

import torch


def adapter_tensors(layers: dict) -> dict[str, torch.Tensor]:
    """The live adapter tensors (not copies), keyed as checkpoint.lora_state keys them."""
    out = {}
    for name, layer in layers.items():
        for key, t in layer.state_dict(keep_vars=True).items():
            if not key.startswith("base."):
                out[f"{name}.{key}"] = t
    return out


class AdapterEMA:
    def __init__(self, layers: dict, decay: float, start_step: int = 0, device: str | torch.device | None = None):
        self.layers, self.decay, self.start_step = layers, decay, start_step
        live = adapter_tensors(layers)
        self.device = torch.device(device) if device is not None else None
        self.shadow = {k: t.detach().to(self.device or t.device, torch.float32, copy=True) for k, t in live.items()}
        self.trained = {k for k, t in live.items() if t.requires_grad}

    @torch.no_grad()
    def update(self, step: int) -> None:
        live = adapter_tensors(self.layers)
        for key, avg in self.shadow.items():
            w = live[key].detach().to(avg.device, torch.float32)
            if step < self.start_step or key not in self.trained:
                avg.copy_(w)
            else:
                avg.mul_(self.decay).add_(w, alpha=1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.shadow.items()}

    def reset(self) -> None:
        """Start again from the current weights (resuming a checkpoint saved without EMA)."""
        live = adapter_tensors(self.layers)
        with torch.no_grad():
            for k, avg in self.shadow.items():
                avg.copy_(live[k].detach())

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.shadow):
            raise ValueError("EMA state does not fit this run's adapters")
        for k, v in state.items():
            self.shadow[k].copy_(v)

    def average(self) -> dict[str, torch.Tensor]:
        """The average, keyed as `adapter_tensors` keys the live tensors, each on its live tensor's device and in its
        dtype: what `training.export.Exporter` writes in their place (the live layers are never changed)."""
        live = adapter_tensors(self.layers)
        return {k: avg.to(live[k].device, live[k].dtype) for k, avg in self.shadow.items()}


def make_ema(cfg, layers: dict, device) -> AdapterEMA | None:
    ema = cfg.train.ema
    if not ema.enabled:
        return None
    return AdapterEMA(layers, ema.decay, ema.start_step, "cpu" if ema.device == "cpu" else device)
