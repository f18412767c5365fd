"""What the LoRA layers cost in one SD 1.5 step, from timings of each layer shape alone.

    python3 benchmarks/lora_layer.py            # CPU, fp32, rank 16, 256 px: about 2 min on 2 cores

A forward pass of the SD 1.5 UNet (256 px) and text encoder with hooks on the default LoRA targets lists
every adapted layer's (tokens, in, out). Each distinct shape is then timed alone, forward + backward to
its input, for three kinds run interleaved round by round: the fused LoRA layer, the same maths as six
autograd ops (linear, linear, scale, add), and the frozen layer without LoRA; 8 layers side by side on one
input, so that a pass is long enough to time. The sum over the step's layers of (LoRA layer - frozen
layer) is what LoRA adds to the step's compute, free of the round-to-round noise that makes two whole
4-second steps hard to compare on a small CPU (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdlora.util.allocator import keep_freed_cpu_memory  # noqa: E402
from sdlora.config import validate  # noqa: E402
from sdlora.lora import LoRALinear  # noqa: E402
from sdlora.lora.layers import LoRALayer  # noqa: E402

CONFIGS = ROOT / "sdlora" / "resources" / "configs" / "sd_v1"
KINDS = ("fused", "autograd", "frozen")


def adapted_shapes(resolution: int) -> Counter:
    """(tokens, in, out) -> how many adapted layers see it in one step (UNet and text encoder, batch 1)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = validate({"model": {"path": "-"}, "data": {"path": "-"}, "output": {"dir": "-"}})
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIGS / "unet"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(CONFIGS / "text_encoder"))
    shapes: Counter = Counter()

    def hook(module, args, _output):
        x = args[0]
        shapes[(x.numel() // x.shape[-1], module.in_features, module.out_features)] += 1

    handles = []
    for model, targets in ((unet, cfg.lora.unet_targets), (text_encoder, cfg.lora.text_encoder_targets)):
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
                handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        ids = torch.zeros(1, 77, dtype=torch.long)
        emb = text_encoder(ids).last_hidden_state
        latent = resolution // 8
        unet(torch.randn(1, 4, latent, latent), torch.tensor([500]), emb)
    for h in handles:
        h.remove()
    return shapes


def make_stack(kind: str, tokens_in_out, rank: int, n: int = 8) -> list[nn.Module]:
    _, d_in, d_out = tokens_in_out
    stack = []
    for _ in range(n):
        base = nn.Linear(d_in, d_out, bias=False)
        base.requires_grad_(False)
        if kind == "frozen":
            stack.append(base)
            continue
        layer = LoRALinear(base, rank, float(rank), init="zero")
        with torch.no_grad():
            layer.lora_B.normal_()
        if kind == "autograd":  # the generic path: F.linear(F.linear(x, A), s·B) added to the base output
            layer.forward = (lambda m: lambda x: LoRALayer.forward(m, x))(layer)
        stack.append(layer)
    return stack


def time_shape(shape, rank: int, rounds: int) -> dict[str, float]:
    """Median seconds per layer, forward + backward to the input, for each kind."""
    torch.manual_seed(0)
    stacks = {k: make_stack(k, shape, rank) for k in KINDS}
    x = torch.randn(1, shape[0], shape[1], requires_grad=True)
    g = torch.randn(1, shape[0], shape[2])  # a dense incoming gradient, as inside a network
    times = {k: [] for k in KINDS}
    for r in range(rounds + 3):
        for k in KINDS:
            t0 = time.perf_counter()
            outputs = [layer(x) for layer in stacks[k]]  # 8 layers side by side on the same input
            torch.autograd.backward(outputs, [g] * len(outputs))
            if r >= 3:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) / len(stacks[k]) for k, v in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=20)
    args = p.parse_args(argv)
    keep_freed_cpu_memory()  # as the trainer does on CPU
    shapes = adapted_shapes(args.resolution)
    print(f"{sum(shapes.values())} adapted layers in {len(shapes)} shapes at {args.resolution} px, rank {args.rank}\n")
    print("| tokens x in x out | layers | frozen ms | fused: LoRA adds | six-op autograd: LoRA adds |")
    print("|---|---|---|---|---|")
    total = dict.fromkeys(KINDS, 0.0)
    for shape, count in sorted(shapes.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        t = time_shape(shape, args.rank, args.rounds)
        for k in KINDS:
            total[k] += count * t[k]
        print(f"| {shape[0]} x {shape[1]} x {shape[2]} | {count} | {t['frozen'] * 1e3:.2f} "
              f"| +{(t['fused'] / t['frozen'] - 1):.0%} | +{(t['autograd'] / t['frozen'] - 1):.0%} |")
    print(f"\nin one step, forward + backward: the adapted layers without LoRA {total['frozen'] * 1e3:.0f} ms; "
          f"LoRA adds {(total['fused'] - total['frozen']) * 1e3:.0f} ms fused, "
          f"{(total['autograd'] - total['frozen']) * 1e3:.0f} ms as six autograd ops")
    return 0


if __name__ == "__main__":
    sys.exit(main())
