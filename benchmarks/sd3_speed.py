"""The SD3.5 Medium LoRA step's speed and peak memory: sdlora against the floor and against the peer, diffusers'
`examples/dreambooth/train_dreambooth_lora_sd3.py` (issue 27 item 12).

The transformer has SD3.5 Medium's architecture (sdlora/resources/configs/sd3.5_medium: width 1536, 24 joint blocks,
the second attention `attn2` in blocks 0-12, QK RMS-norm) with random weights, nothing downloaded; `--blocks N`
keeps the first N joint blocks (the CPU row: a 2.5 B-parameter transformer step at 256 px is minutes on 2 cores;
the blocks are alike, so the per-block cost and the ratios carry over, stated in the table's heading). The text
encoders are frozen and their outputs cached, as both trainers do by default (diffusers' script encodes its prompt
once; sdlora's text cache): each step reads a (1, 77 + T5 tokens, 4096) conditioning and a (1, 2048) pooled vector;
the latents are cached too (no VAE pass). Batch 1. `--arch tiny`: the test suite's tiny SD3.5 Medium, a smoke run
(its numbers mean nothing).

| variant | one step |
|---|---|
| floor | the frozen transformer's forward and backward to its input (the least any LoRA step does) |
| sdlora | sdlora's LoRA (`inject_all`, `place_models`, `build_param_groups`, `make_optimizer`: AdamW), its rectified-flow objective (`SD3Family.objective`: logit-normal sigma draws, shift 3, velocity target) and `training.step.step_loss`; gradient clipping at 1.0 |
| peer | diffusers' script: peft `LoraConfig(r, lora_alpha=r, init_lora_weights="gaussian", target_modules=[attn.to_q, ...])` through `transformer.add_adapter`, LoRA weights in fp32 (`cast_training_params`), `torch.optim.AdamW` (its defaults: weight decay 1e-4), `compute_density_for_timestep_sampling("logit_normal")`, the scheduler's sigmas, `compute_loss_weighting_for_sd3`, `clip_grad_norm_(1.0)` |

Both adapt the same modules: diffusers' default targets (`attn.to_q/k/v`, `attn.to_out.0`, `attn.add_q/k/v_proj`,
`attn.to_add_out`; not SD3.5 Medium's `attn2`, which diffusers' `attn.` prefix leaves out), rank = alpha = 16.
Timing and memory as benchmarks/train_speed.py (interleaved rounds, paired ratios, the profiler's allocation record
on CPU); the table goes into docs/benchmarks.md between its `table:sd35m:<device>` markers.

    python3 benchmarks/sd3_speed.py --blocks 4                  # the CPU row (256 px, fp32)
    python3 benchmarks/sd3_speed.py --arch tiny --quick --doc ''  # smoke: seconds
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import train_speed as ts  # noqa: E402 (benchmarks/train_speed.py: sets sys.path and HF_HUB_OFFLINE)

import torch  # noqa: E402

from sdlora.config import validate  # noqa: E402
from sdlora.util import atomic  # noqa: E402
from sdlora.util.allocator import keep_freed_cpu_memory  # noqa: E402
from speed_report import Result, summary, table, write_doc  # noqa: E402

CONFIGS = ts.ROOT / "sdlora" / "resources" / "configs" / "sd3.5_medium"
DIFFUSERS_SD3_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                         "attn.add_v_proj", "attn.to_add_out"]  # train_dreambooth_lora_sd3.py's default
VAE_CONFIG = {"scaling_factor": 1.5305, "shift_factor": 0.0609}  # SD3's VAE (latents cached: the objective reads it)
POOLED = 2048


def build_base(arch: str, blocks: int | None):
    """SimpleNamespace(transformer, scheduler, family, joint_dim): SD3.5 Medium's transformer (random weights, frozen),
    its first `blocks` joint blocks, or the tiny model's."""
    from types import SimpleNamespace

    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from sdlora.model.families import SD35M

    torch.manual_seed(0)
    if arch == "tiny":
        import tempfile

        from sdlora.model.loading import load_components
        from sdlora.model.tiny_sd3 import make_tiny_sd3

        comps = load_components(str(make_tiny_sd3(Path(tempfile.mkdtemp(prefix="sd3_speed_")) / "m", variant="sd35m")))
        transformer, scheduler = comps.denoiser, comps.noise_scheduler
    else:
        config = json.loads((CONFIGS / "transformer" / "config.json").read_text())
        if blocks:
            config["num_layers"] = blocks
            config["dual_attention_layers"] = [i for i in config["dual_attention_layers"] if i < blocks]
        transformer = SD3Transformer2DModel.from_config(config)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(CONFIGS, subfolder="scheduler")
    transformer.requires_grad_(False)
    return SimpleNamespace(transformer=transformer, scheduler=scheduler, family=SD35M,
                           joint_dim=transformer.config.joint_attention_dim,
                           pooled=transformer.config.pooled_projection_dim)


def make_batch(base, resolution, device, dtype, i):
    """Cached latents (1, 16, res/8, res/8) and a cached conditioning; four distinct ones, in turn."""
    from types import SimpleNamespace

    from sdlora.model.sd3 import SD3Conditioning

    g = torch.Generator().manual_seed(1000 + i % 4)
    lat = resolution // 8
    hidden = torch.randn(1, 77 + base.t5_tokens, base.joint_dim, generator=g).to(device, dtype)
    pooled = torch.randn(1, base.pooled, generator=g).to(device, dtype)
    half = base.pooled // 2
    return SimpleNamespace(latents=torch.randn(1, 16, lat, lat, generator=g).to(device, dtype),
                           cond=SD3Conditioning(hidden, pooled, (half, half), (half, half)))


def sdlora_variant(base, cfg, device, dtype, autocast):
    from sdlora.lora import build_param_groups, inject_all
    from sdlora.training.draws import GeneratorDraws
    from sdlora.training.optim import make_optimizer
    from sdlora.training.placement import place_models
    from sdlora.training.step import step_loss

    transformer = ts.shared_copy(base.transformer)
    layers = inject_all({"transformer": transformer}, cfg, base.family)
    from types import SimpleNamespace

    comps = SimpleNamespace(denoiser=transformer, unet=transformer, vae=torch.nn.Linear(1, 1), text_encoders={})
    place_models(comps, layers, device, dtype, cfg)
    groups = build_param_groups(layers, cfg, base.family)
    opt = make_optimizer(groups.groups, cfg)
    params = [p for g in groups.groups for p in g["params"]]
    objective = base.family.objective(base.scheduler, VAE_CONFIG, cfg.loss)
    draws = GeneratorDraws(torch.Generator().manual_seed(0), 1, device)

    def step(b):
        noised = objective.noised(b.latents, *objective.draw(draws, b.latents))
        loss = step_loss(objective, base.family, transformer, noised, b.cond, {}, cfg.loss, autocast)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return ts.Variant("sdlora", step, params, opt)


def peer_variant(base, rank, device, dtype, autocast):
    """train_dreambooth_lora_sd3.py's LoRA set-up and step (module docstring), on the same cached inputs."""
    import copy

    from diffusers.training_utils import (cast_training_params, compute_density_for_timestep_sampling,
                                          compute_loss_weighting_for_sd3)
    from peft import LoraConfig

    transformer = ts.shared_copy(base.transformer)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                       target_modules=DIFFUSERS_SD3_TARGETS))
    transformer.to(device=device, dtype=dtype)
    cast_training_params([transformer], dtype=torch.float32)
    transformer.train()
    params = [p for p in transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": params, "lr": 1e-4}], betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    sched = copy.deepcopy(base.scheduler)
    all_sigmas, all_timesteps = sched.sigmas.to(device), sched.timesteps.to(device)
    gen = torch.Generator().manual_seed(0)

    def step(b):
        x0 = b.latents
        noise = torch.randn(x0.shape, generator=gen).to(device, x0.dtype)
        u = compute_density_for_timestep_sampling(weighting_scheme="logit_normal", batch_size=1, logit_mean=0.0,
                                                  logit_std=1.0, mode_scale=1.29)
        indices = (u * sched.config.num_train_timesteps).long()
        timesteps = all_timesteps[indices]
        step_indices = [(all_timesteps == t).nonzero().item() for t in timesteps]
        sigmas = all_sigmas[step_indices].flatten().to(x0.dtype).reshape(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * x0 + sigmas * noise
        with autocast():
            pred = transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=b.cond.hidden,
                               pooled_projections=b.cond.pooled, return_dict=False)[0]
        weighting = compute_loss_weighting_for_sd3(weighting_scheme="logit_normal", sigmas=sigmas)
        target = noise - x0
        loss = torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(1, -1), 1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()

    return ts.Variant("peer", step, params, opt)


def floor_variant(base, cfg, device, dtype, autocast):
    """The frozen transformer's forward and backward to its (noisy latent) input, with sdlora's loss."""
    from sdlora.training.draws import GeneratorDraws
    from sdlora.training.step import step_loss

    objective = base.family.objective(base.scheduler, VAE_CONFIG, cfg.loss)
    draws = GeneratorDraws(torch.Generator().manual_seed(0), 1, device)

    def step(b):
        noised = objective.noised(b.latents, *objective.draw(draws, b.latents))
        noised.noisy.requires_grad_(True)
        step_loss(objective, base.family, base.transformer, noised, b.cond, {}, cfg.loss, autocast).backward()

    return ts.Variant("floor", step)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--arch", default="full", choices=["full", "tiny"])
    p.add_argument("--blocks", type=int, default=None, help="keep the first N of the 24 joint blocks (default: all)")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--t5-tokens", type=int, default=256, help="T5 tokens of the cached conditioning (pipeline: 256)")
    p.add_argument("--dtype", default="fp32", choices=sorted(ts.DTYPES))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--only", nargs="*", help="variants to run (floor, sdlora, peer; default all)")
    p.add_argument("--quick", action="store_true", help="smoke run: 64 px, 16 T5 tokens, 1 warm-up, 2 timed rounds")
    p.add_argument("--doc", default=str(ts.ROOT / "docs" / "benchmarks.md"), help="page for the table ('' = none)")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    if args.quick:
        args.resolution, args.t5_tokens, args.warmup, args.steps = 64, 16, 1, 2
    args.family = "sd35m"
    return args


def main(argv=None) -> int:
    import contextlib

    args = parse_args(argv)
    device, dtype = torch.device(args.device), ts.DTYPES[args.dtype]
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 else contextlib.nullcontext
    if device.type == "cpu":
        keep_freed_cpu_memory()  # as the trainer does on CPU, the same for every variant
    t0 = time.perf_counter()
    base = build_base(args.arch, args.blocks)
    base.t5_tokens = args.t5_tokens
    names = [n for n, _ in base.transformer.named_modules()]  # the last block has no to_add_out (context_pre_only)
    present = [t for t in DIFFUSERS_SD3_TARGETS if any(n.endswith("." + t) for n in names)]
    cfg = validate({"model": {"path": "-"}, "data": {"path": "-"}, "output": {"dir": "-"},
                    # the peer's modules: its targets match by the path's end (peft), sdlora's `re:` is searched
                    "lora": {"rank": args.rank, "alpha": args.rank,
                             "unet_targets": [f"re:\\.{re.escape(t)}$" for t in present]},
                    "optim": {"optimizer": "adamw", "max_grad_norm": 1.0}, "train": {"seed": 0},
                    "text_encoder": {"train": False}, "log": {"tracker": "none"}})
    wanted = lambda n: args.only is None or n in args.only  # noqa: E731
    variants = []
    if wanted("floor"):
        variants.append(floor_variant(base, cfg, device, dtype, autocast))
    if wanted("sdlora"):
        variants.append(sdlora_variant(base, cfg, device, dtype, autocast))
    if wanted("peer"):
        variants.append(peer_variant(base, args.rank, device, dtype, autocast))
    base.transformer.to(device, dtype)
    counts = {v.name: sum(p.numel() for p in v.adapter_params) for v in variants if v.adapter_params}
    print(f"built {len(variants)} variants in {time.perf_counter() - t0:.0f} s; "
          f"{sum(p.numel() for p in base.transformer.parameters()) / 1e6:.0f} M frozen parameters, "
          f"{base.transformer.config.num_layers} joint blocks; LoRA parameters per variant {counts}", flush=True)
    ts.run_rounds(variants, base, args, device, dtype, say=lambda line: print(line, flush=True), batch_of=make_batch)
    results = [Result(v.name, list(v.seconds), v.peak_bytes, v.persistent_bytes()) for v in variants]
    tbl = table(results)
    print(tbl)
    blocks = f"first {args.blocks} of 24 joint blocks" if args.blocks else "24 joint blocks"
    model = (f"SD3.5 Medium ({blocks}, random weights; T5 {args.t5_tokens} tokens, cached)" if args.arch == "full"
             else "the tiny SD3.5 Medium")
    if args.doc:
        write_doc(Path(args.doc), tbl, args, device, time.perf_counter() - t0, model=model, script="sd3_speed.py")
    if args.json:
        atomic.write_json(Path(args.json), {"variants": summary(results), "settings": vars(args)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
