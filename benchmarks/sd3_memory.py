"""An SD3.5 Medium / Large LoRA's training memory at 1024 px, batch 1, rank 16: the step traced with fake tensors on
CPU, by benchmarks/sdxl_memory.py's method (its tracker, its CUDA float32-norm policy and its GPU assumptions).

    python3 benchmarks/sd3_memory.py             # the table (markdown on stdout), docs/sd3-memory.json
    python3 benchmarks/sd3_memory.py --quick     # SD3.5 Medium with checkpointing only

The setting (issue 27 item 12): the real architectures from the bundled configs (sdlora/resources/configs/
sd3.5_medium and sd3.5_large: transformer and scheduler configs as published), frozen weights in bf16, sdlora's LoRA
(rank 16, alpha 16, fp32 factors and alphas) on diffusers' default SD3 targets (both streams' attention: attn.to_q/k/v,
attn.to_out.0, attn.add_q/k/v_proj, attn.to_add_out; `train_dreambooth_lora_sd3.py`), injected by
`sdlora.lora.inject` and placed by `training/placement.place_models` (which turns on gradient checkpointing);
every encoder frozen and its outputs cached, so only the transformer is resident: the VAE (84 M parameters) and the
text encoders (T5-XXL alone 4.7 B) are not on the device during the step. Inputs: the cached latent distribution
(1 x 16 x 128 x 128, bf16) and the cached conditioning (1 x (77 + 256) x 4096 hidden states and 1 x 2048 pooled, bf16).

The step is the rectified-flow step of sdlora/model/flow_matching.py: latents `(x - shift) * scale`, a logit-normal
sigma shifted by the scheduler config's 3.0, `x_t = (1 - sigma) x0 + sigma noise`, the transformer called with
keyword arguments and `timestep = sigma * 1000` under bf16 autocast, the velocity target, MSE, backward, gradient
clipping, torch AdamW (fp32 moments; bitsandbytes' 8-bit AdamW counted in its place as sdxl_memory.py does),
zero_grad. Two steps, so the optimiser state is resident in the second. The GPU estimate adds sdxl_memory.py's
assumptions (0.5 GiB CUDA context, 10 % allocator overhead); the text-encoder output cache is counted apart (per
caption: 333 x 4096 + 2048 bf16 values, 2.7 MB; training/text_cache.py keeps it on the training device, up to
data.text_cache_mb), as are the frozen text encoders, which text_encoder.offload (default auto) keeps on the CPU
when their outputs are cached (training/offload.py; docs/sd3-memory.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode  # noqa: E402

from memory_tracer import (CARD_GIB, GIB, StepMemTracker, adam8bit_bytes, cuda_fp32_norms,  # noqa: E402
                            compute_dtype, fake_module_conversion, gib, on_gpu, with_adam8bit)
from sdlora.config import validate  # noqa: E402
from sdlora.lora import build_param_groups  # noqa: E402
from sdlora.lora.inject import inject, plan_denoiser  # noqa: E402
from sdlora.model import flow_matching as fm  # noqa: E402
from sdlora.model.families import SD1  # noqa: E402
from sdlora.model.objective import vae_latents  # noqa: E402
from sdlora.training.losses import per_sample_loss  # noqa: E402
from sdlora.training.optim import make_optimizer  # noqa: E402
from sdlora.training.placement import place_models  # noqa: E402
from sdlora.util import atomic  # noqa: E402

CONFIGS = ROOT / "sdlora" / "resources" / "configs"
SD3_VAE_SHIFT, SD3_VAE_SCALE = 0.0609, 1.5305  # SD3's VAE config (read from the VAE config in training)
DIFFUSERS_SD3_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                         "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
T5_TOKENS = 256  # the pipeline's max_sequence_length default


def sd3_config(checkpointing: bool = True, rank: int = 16, base_precision: str = "full", mixed_precision: str = "bf16"):
    return validate({"model": {"path": "sd3", "base_precision": base_precision}, "data": {"path": "d"},
                     "output": {"dir": "o"},
                     "lora": {"rank": rank, "alpha": rank, "unet_targets": DIFFUSERS_SD3_TARGETS},
                     "text_encoder": {"train": False}, "optim": {"optimizer": "adamw", "max_grad_norm": 1.0},
                     "train": {"mixed_precision": mixed_precision, "gradient_checkpointing": checkpointing}})


def build(transformer_config: dict, cfg):
    """The transformer from its config (random values), LoRA injected and placed as training does."""
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel.from_config(transformer_config)
    transformer.requires_grad_(False)  # frozen, as inject_all freezes the adaptable parts before injecting
    # no SD3 family yet: the transformer is adapted under the denoiser name "unet" (the trace needs no names)
    layers = inject(transformer, "unet", plan_denoiser(transformer, cfg.lora), cfg.lora, cfg.train.seed)
    comps = types.SimpleNamespace(unet=transformer, denoiser=transformer, vae=torch.nn.Linear(1, 1), text_encoders={})
    fake = isinstance(next(transformer.parameters()), FakeTensor)
    for t in (*transformer.parameters(), *transformer.buffers()):
        if fake:  # a scalar made by torch.tensor() is a fake-mode constant; a trained alpha is no constant
            t.constant = None
    with fake_module_conversion(fake):
        place_models(comps, layers, torch.device("cpu"), compute_dtype(cfg), cfg)
    return transformer, layers


def make_train_step(transformer, params, optimizer, max_grad_norm: float | None, dtype=torch.bfloat16):
    draw = fm.SigmaDraw(sampling="logit_normal", shift=3.0)

    def step(inputs: dict) -> None:
        sample = inputs["mean"] + inputs["std"] * torch.randn_like(inputs["mean"])
        x0 = vae_latents(sample, SD3_VAE_SCALE, SD3_VAE_SHIFT)
        noise = torch.randn_like(x0)
        sigma = fm.from_normal(torch.randn(x0.shape[0]), draw.logit_mean, draw.logit_std)
        sigma = fm.shift_sigmas(sigma, draw.shift).to(x0.device)
        noisy = fm.noisy_latents(x0, noise, sigma)
        with cuda_fp32_norms():
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                pred = transformer(hidden_states=noisy, encoder_hidden_states=inputs["hidden"],
                                   pooled_projections=inputs["pooled"], timestep=fm.transformer_timestep(sigma),
                                   return_dict=False)[0]
            target = fm.training_target("velocity", x0, noise)
            weight = fm.loss_weight("none", sigma)
            loss = (per_sample_loss(pred, target, "mse") * weight).mean()  # as training/losses.py reduces it
            loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def trace(transformer_config: dict, px: int, cfg, *, fake: bool, steps: int = 2, joint_dim: int = 4096,
          pooled: int = 2048, t5_tokens: int = T5_TOKENS) -> dict:
    mode = FakeTensorMode() if fake else contextlib.nullcontext()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with mode:
        transformer, layers = build(transformer_config, cfg)
        groups = build_param_groups(layers, cfg, SD1)  # the rates of a "unet" denoiser (see build)
        params = [p for g in groups.groups for p in g["params"]]
        optimizer = make_optimizer(groups.groups, cfg)
        lat = px // 8
        dtype = compute_dtype(cfg)
        inputs = {"mean": torch.randn(1, 16, lat, lat, dtype=dtype),
                  "std": torch.rand(1, 16, lat, lat, dtype=dtype),
                  "hidden": torch.randn(1, 77 + t5_tokens, joint_dim, dtype=dtype),
                  "pooled": torch.randn(1, pooled, dtype=dtype)}
        step = make_train_step(transformer, params, optimizer, cfg.optim.max_grad_norm, dtype)
        tracker = StepMemTracker()
        tracker.track_external(transformer, optimizer, *inputs.values())
        built = time.perf_counter()
        with tracker:
            for _ in range(steps):
                step(inputs)
                tracker.reset_mod_stats()
        return {"px": px, "fake": fake, "checkpointing": cfg.train.gradient_checkpointing,
                "peak": tracker.by_category("peak"), "peak_phase": tracker.peak_phase,
                "phase_peaks": dict(tracker.phase_peaks), "trained": [(p.numel(), p.dtype.itemsize) for p in params],
                "frozen_parameters": sum(p.numel() for p in transformer.parameters() if not p.requires_grad),
                "build_seconds": built - t0, "step_seconds": (time.perf_counter() - built) / steps}


def text_cache_bytes_per_caption(t5_tokens: int = T5_TOKENS) -> int:
    return ((77 + t5_tokens) * 4096 + 2048) * 2


def table(runs: list[dict]) -> str:
    out = ("| model | gradient checkpointing | frozen weights (bf16) | LoRA (fp32) | activations | traced peak, GiB "
           "(phase) | **GPU estimate, AdamW** | **GPU estimate, 8-bit AdamW** | fits "
           f"{CARD_GIB} GiB (AdamW / 8-bit)? |\n|---|---|---:|---:|---:|---:|---:|---:|---|\n")
    for r in runs:
        p = r["peak"]
        lora = sum(n * s for n, s in r["trained"])
        fits = lambda b: "yes" if on_gpu(b) <= CARD_GIB * GIB else "no"  # noqa: E731
        out += (f"| {r['model']} | {'on' if r['checkpointing'] else 'off'} "
                f"| {gib(p['parameters'] + p.get('buffers', 0) - lora)} | {gib(lora)} | {gib(p.get('activations', 0))} "
                f"| {gib(p['total'])} ({r['peak_phase']}) | **{gib(on_gpu(p['total']))}** "
                f"| **{gib(on_gpu(with_adam8bit(r)))}** | {fits(p['total'])} / {fits(with_adam8bit(r))} |\n")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="SD3.5 Medium with checkpointing only")
    ap.add_argument("--json", default=str(ROOT / "docs" / "sd3-memory.json"), help="'' to write none")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    plan = [("sd3.5_medium", True)] if args.quick else [("sd3.5_medium", True), ("sd3.5_medium", False),
                                                        ("sd3.5_large", True), ("sd3.5_large", False)]
    runs = []
    for model, ckpt in plan:
        config = json.loads((CONFIGS / model / "transformer" / "config.json").read_text())
        r = {"model": model, **trace(config, 1024, sd3_config(ckpt), fake=True)}
        print(f"{model}, checkpointing {ckpt}: peak {gib(r['peak']['total'])} GiB (build {r['build_seconds']:.0f} s, "
              f"{r['step_seconds']:.0f} s per step)", file=sys.stderr, flush=True)
        runs.append(r)
    command = f"python3 benchmarks/sd3_memory.py{' --quick' if args.quick else ''}"
    print(f"Produced by `{command}` ({platform.machine()}, 1 thread, torch {torch.__version__}, "
          f"{time.perf_counter() - t0:.0f} s).\n\n{table(runs)}\nTrained: "
          + "; ".join(f"{r['model']} {sum(n for n, _ in r['trained']) / 1e6:.2f} M LoRA parameters"
                      for r in runs if r["checkpointing"])
          + f". Text-encoder output cache: {text_cache_bytes_per_caption() / 2**20:.2f} MiB per caption (bf16).")
    if args.json:
        atomic.write_json(args.json, {"command": command, "runs": [
            {**{k: v for k, v in r.items() if k != "trained"}, "trained_parameters": sum(n for n, _ in r["trained"]),
             "adam8bit_state_bytes": adam8bit_bytes(r["trained"])} for r in runs]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
