"""An SDXL LoRA's training memory at 1024 px, batch 1, rank 32: the real step traced with fake tensors on CPU.

    python3 benchmarks/sdxl_memory.py              # the tables (markdown on stdout), docs/sdxl-memory.json; 8 min
    python3 benchmarks/sdxl_memory.py --quick      # 1024 px with checkpointing and the tiny-model checks only

The setting (configs/sdxl-character.yaml's memory options with the text encoders frozen, so their outputs are
cached): SDXL base 1.0's architecture from the bundled configs (sdlora/resources/configs/sdxl_base_v1-0), frozen
weights in bf16 (`train.mixed_precision: bf16`), sdlora's LoRA (rank 32, alpha 32, orthogonal init, learnable alpha,
the default UNet targets to_q/to_k/to_v/to_out.0; factors and alphas fp32) injected by `sdlora.lora.inject_all`,
placed by `training/placement.place_models` (which also turns on `train.gradient_checkpointing`), batch 1, latents
cached (`data.cache_latents`: the step starts from the cached mean and std, 1x4xH/8xW/8 bf16) and text-encoder
outputs cached (hidden states 1x77x2048 and pooled embedding 1x1280, bf16 as the bf16 encoders give them).

Method: everything is built and run under torch's FakeTensorMode, so shapes, dtypes, aliasing and lifetimes are the
real ones but no memory is allocated and no arithmetic is done; `torch.distributed._tools.mem_tracker.MemTracker`
(a TorchDispatchMode) counts the bytes of every live tensor storage by category (parameters, buffers, gradients,
activations, backward temporaries, optimiser state) and keeps the peak. Two training steps run as the loop runs them
(training/loop.py: noise and timestep draws, `scheduler.add_noise`, the UNet under bf16 autocast with
`SDXL.unet_kwargs`, `losses.diffusion_loss` with the config's min-SNR weighting, backward, `clip_grad_norm_`,
the optimiser step, `zero_grad(set_to_none=True)`); the second step has the optimiser state resident throughout,
so the peak over both is the steady state. The optimiser is torch AdamW through `training/optim.make_optimizer`
(fp32 moments, 8 bytes per trained parameter): bitsandbytes' 8-bit AdamW cannot run on fake CPU tensors, so its
state is counted instead (2 bytes per parameter plus one fp32 absmax per 256-value block per moment; tensors under
4096 values, the alphas, keep fp32 moments, bitsandbytes' `min_8bit_size`) and swapped in for AdamW's.
`place_models` keeps the VAE and both text encoders on the device in bf16 even when latents and text-encoder outputs
are cached; they are built and tracked as parameters. The text-encoder output cache (`training/text_cache.py`) is
counted: up to its 2048-caption capacity, and with `shuffle_tags` nearly every step's caption is a new entry.

Validation (printed with the table): (a) fake against real: the same two steps on the tiny SDXL model
(`model/tiny.make_tiny_sdxl`) with real tensors and with fake ones, MemTracker in both; (b) against an independent
instrument: a third real step on the tiny model under torch.profiler (`benchmarks/train_speed.cpu_peak_bytes`'s
quantity: the most CPU memory allocated during the step above what was allocated before it) against MemTracker's
peak minus its count at the step's start; (c) the earlier real-tensor run of the full SDXL UNet at 128 px
(the removed benchmarks/sdxl_memory_old.py; its step: no optimiser, default LoRA init, fp32 inputs) measured
0.176 GiB with the profiler; the same step is traced here with fake tensors.

Assumptions (not measurable on CPU): the CUDA context and kernels take about 0.5 GiB outside PyTorch's allocator, and
the caching allocator's fragmentation plus kernel workspaces (cuDNN's, the attention kernels'; allocated inside
kernels, so no dispatch mode sees them, as check (b) shows on CPU) add 10 % to the allocated peak. Autocast: CUDA's
runs group_norm and layer_norm in float32, CPU's keeps them in bf16; `cuda_fp32_norms` applies CUDA's policy to them
(the table also has a row with CPU's lists). Attention runs as torch's CPU flash kernel
(`_scaled_dot_product_flash_attention_for_cpu`, reported by the op log), which like CUDA's flash and
memory-efficient kernels never materialises the tokens x tokens matrix. MemTracker counts CPU bytes as requested;
CUDA rounds each block up to 512 bytes (negligible here).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from memory_tracer import (CARD_GIB, CUDA_CONTEXT_GIB, FRAGMENTATION, GIB, OpCounter,  # noqa: E402
                            StepMemTracker, adam8bit_bytes, compute_dtype, cuda_fp32_norms, fake_module_conversion, gib, on_gpu,
                            with_adam8bit)
from sdlora.config import validate  # noqa: E402
from sdlora.config_file import read_config_file  # noqa: E402
from sdlora.lora import build_param_groups, inject_all  # noqa: E402
from sdlora.model.families import SD1, SDXL, SDXLConditioning  # noqa: E402
from sdlora.training.losses import diffusion_loss, diffusion_target, sample_noise  # noqa: E402
from sdlora.training.optim import make_optimizer  # noqa: E402
from sdlora.training.placement import place_models  # noqa: E402
from sdlora.training.text_cache import DEFAULT_CAPACITY  # noqa: E402
from sdlora.util import atomic  # noqa: E402

SDXL_CONFIGS = ROOT / "sdlora" / "resources" / "configs" / "sdxl_base_v1-0"
CHARACTER_CONFIG = ROOT / "configs" / "sdxl-character.yaml"
OLD_PROFILER_PEAK_GIB = 0.176  # benchmarks/sdxl_memory_old.py, 128 px, real SDXL UNet on CPU (229 s)


# ---- the models, the config and the step


def sdxl_config(checkpointing: bool = True, overrides: dict | None = None, path: Path = CHARACTER_CONFIG):
    """configs/sdxl-character.yaml (or the config at `path`) with the text encoders frozen (outputs cached) and torch
    AdamW traced in place of bitsandbytes' (its state is counted apart); `overrides` replace whole sections' keys."""
    raw = read_config_file(path)
    raw["model"]["path"] = "sdxl"  # never read: the models are built from the bundled configs
    raw["text_encoder"]["train"] = False
    raw["reg"] = {}  # the embedding-norm penalty applies to trained text encoders only
    raw["train"]["gradient_checkpointing"] = checkpointing
    raw["optim"]["optimizer"] = "adamw"
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update(values)
    return validate(raw)


def read_json(folder: Path, part: str) -> dict:
    return json.loads((folder / part / "config.json").read_text())


def family_of(folder: Path):
    """SDXL where the configs have a second text encoder, else SD 1.x (one CLIP-L encoder, conditioning = its
    hidden states)."""
    return SDXL if (folder / "text_encoder_2").is_dir() else SD1


def build(folder: Path, cfg, with_frozen: bool = True, device: torch.device = torch.device("cpu")):
    """The family's models from `folder`'s configs (random values), LoRA injected and placed on `device` as training
    does. Returns (components, layers); call inside FakeTensorMode for fake tensors."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel.from_config(read_json(folder, "unet"))
    text_encoders, vae = {}, torch.nn.Linear(1, 1)
    if with_frozen:
        vae = AutoencoderKL.from_config(read_json(folder, "vae"))
        text_encoders = {"text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))}
        if family_of(folder) is SDXL:
            text_encoders["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    comps = types.SimpleNamespace(unet=unet, denoiser=unet, vae=vae, text_encoders=text_encoders, noise_scheduler=scheduler,
                                  scaling_factor=read_json(folder, "vae")["scaling_factor"])
    layers = inject_all({"unet": unet, **text_encoders}, cfg, family_of(folder))
    models = [unet, vae, *text_encoders.values()]
    fake = isinstance(next(unet.parameters()), torch._subclasses.fake_tensor.FakeTensor)
    for t in (t for m in models for t in (*m.parameters(), *m.buffers())):
        if fake:  # a scalar made by torch.tensor() is a fake-mode constant; a trained alpha is no constant
            t.constant = None
    with fake_module_conversion(fake):
        place_models(comps, layers, device, compute_dtype(cfg), cfg)
    return comps, layers


def cached_inputs(px: int, hidden_width: int, pooled_width: int, widths: tuple[int, int], device="cpu",
                  family=SDXL, dtype: torch.dtype = torch.bfloat16) -> dict:
    """One cached sample as the step reads it: the latent distribution (in `dtype`, as `latent_distribution`
    returns it on a VAE in that dtype), the cached conditioning (`dtype`; SD 1.x: the hidden states alone) and the
    micro-conditioning sizes (float32 pixels)."""
    lat, bf16 = px // 8, {"dtype": dtype, "device": device}
    hidden = torch.randn(1, 77, hidden_width, **bf16)
    size = torch.tensor([[float(px), float(px)]], device=device)
    return {"mean": torch.randn(1, 4, lat, lat, **bf16), "std": torch.rand(1, 4, lat, lat, **bf16),
            "cond": hidden if family is not SDXL else
            SDXLConditioning(hidden, torch.randn(1, pooled_width, **bf16), tuple(hidden.split(list(widths), dim=-1))),
            "batch": {"original_size": size, "crop_top_left": torch.zeros(1, 2, device=device),
                      "target_size": size.clone()}}


def input_tensors(inputs: dict) -> list[torch.Tensor]:
    """The cached sample's tensors the tracker counts as inputs (latent mean and std, hidden states, SDXL's pooled)."""
    cond = inputs["cond"]
    return [inputs["mean"], inputs["std"], *((cond,) if isinstance(cond, torch.Tensor) else (cond.hidden, cond.pooled))]


def make_train_step(comps, cfg, params, optimizer, cuda_lists: bool = True, device=torch.device("cpu")):
    """One training step as training/loop.py runs it for a cached batch (a non-dropped caption); `cuda_lists`: the
    autocast region uses CUDA autocast's float32 policy for the normalisations (cuda_fp32_norms), else CPU
    autocast's own. On a CUDA `device` the step runs under CUDA's own autocast (`cuda_lists` is then moot)."""
    unet, scheduler, scaling = comps.unet, comps.noise_scheduler, comps.scaling_factor  # the VAE config's
    family, dtype = (SDXL if "text_encoder_2" in comps.text_encoders else SD1), compute_dtype(cfg)

    def step(inputs: dict) -> None:
        latents = (inputs["mean"] + inputs["std"] * torch.randn_like(inputs["mean"])) * scaling
        noise = sample_noise(latents, cfg.loss.noise_offset)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (1,), device=device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        # the lists act inside autocast only, which includes the checkpoints' recomputation during backward
        with cuda_fp32_norms() if cuda_lists and device.type == "cpu" else contextlib.nullcontext():
            # accelerator.autocast() under mixed_precision bf16; none in float32 training
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                pred = unet(noisy, timesteps, **family.unet_kwargs(inputs["cond"], inputs["batch"])).sample
            target = diffusion_target(scheduler, latents, noise, timesteps)
            loss = diffusion_loss(pred, target, timesteps, scheduler, cfg.loss)
            loss.backward()
        if cfg.optim.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def trace(folder: Path, px: int, cfg, *, fake: bool, steps: int = 2, count_ops: bool = False,
          widths=(768, 1280), pooled=1280, profile_third: bool = False, cuda_lists: bool = True) -> dict:
    """Build the models and run `steps` training steps under StepMemTracker, fake or real tensors."""
    mode = FakeTensorMode() if fake else contextlib.nullcontext()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with mode:
        comps, layers = build(folder, cfg)
        groups = build_param_groups(layers, cfg, family_of(folder))
        params = [p for g in groups.groups for p in g["params"]]
        optimizer = make_optimizer(groups.groups, cfg)
        inputs = cached_inputs(px, sum(widths), pooled, widths, family=family_of(folder), dtype=compute_dtype(cfg))
        step = make_train_step(comps, cfg, params, optimizer, cuda_lists)
        tracker = StepMemTracker()
        tracker.track_external(comps.unet, comps.vae, *comps.text_encoders.values(), optimizer,
                               *input_tensors(inputs))
        ops = OpCounter()
        built = time.perf_counter()
        with tracker, (ops if count_ops else contextlib.nullcontext()):
            start = tracker.total()
            for i in range(steps):
                step(inputs)
                tracker.reset_mod_stats()  # MemTracker refuses a second forward of the same root otherwise
        result = {"px": px, "fake": fake, "checkpointing": cfg.train.gradient_checkpointing, "cuda_lists": cuda_lists,
                  "start_bytes": start, "peak": tracker.by_category("peak"), "peak_phase": tracker.peak_phase,
                  "phase_peaks": dict(tracker.phase_peaks),
                  "trained": [(p.numel(), p.dtype.itemsize) for p in params],
                  "build_seconds": built - t0, "step_seconds": (time.perf_counter() - built) / steps,
                  "attention_ops": {k: v for k, v in ops.counts.items() if "attention" in k or "softmax" in k}}
        if profile_third:  # (b): one more step under the profiler and a fresh tracker at once
            from train_speed import cpu_peak_bytes

            third = StepMemTracker()
            third.track_external(comps.unet, comps.vae, *comps.text_encoders.values(), optimizer,
                                 *input_tensors(inputs))
            with third:
                before = third.total()
                result["profiler_peak_above_start"] = cpu_peak_bytes(step, inputs)
            result["tracker_peak_above_start"] = third.total("peak") - before
    return result


def old_script_step_peak(px: int = 128) -> int:
    """(c) benchmarks/sdxl_memory_old.py's measured step, fake: bytes above the step's start at the peak."""
    cfg = validate({"model": {"path": "sdxl"}, "data": {"path": "d"}, "output": {"dir": "o"},
                    "lora": {"rank": 32, "alpha": 32}, "text_encoder": {"train": False},
                    "train": {"mixed_precision": "bf16", "gradient_checkpointing": True}})
    with FakeTensorMode():
        comps, _ = build(SDXL_CONFIGS, cfg, with_frozen=False)
        unet, lat = comps.unet, px // 8
        batch = {"noisy": torch.randn(1, 4, lat, lat), "target": torch.randn(1, 4, lat, lat),
                 "t": torch.tensor([500]), "hidden": torch.randn(1, 77, 2048),
                 "added": {"text_embeds": torch.randn(1, 1280),
                           "time_ids": torch.tensor([[px, px, 0, 0, px, px]], dtype=torch.float32)}}
        tracker = StepMemTracker()
        tracker.track_external(unet, batch["noisy"], batch["target"], batch["hidden"], batch["added"]["text_embeds"])
        with tracker:
            start = tracker.total()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                pred = unet(batch["noisy"], batch["t"], batch["hidden"], added_cond_kwargs=batch["added"]).sample
            loss = diffusion_loss(pred, batch["target"], batch["t"], None, cfg.loss)
            loss.backward()
            for p in unet.parameters():
                p.grad = None
        return tracker.total("peak") - start


# ---- counted parts and the table


def text_cache_bytes(capacity: int = DEFAULT_CAPACITY) -> int:
    """The text-encoder output cache full: per caption 77 x 2048 hidden + 1280 pooled values in bf16."""
    return capacity * (77 * 2048 + 1280) * 2


def sdxl_tables(runs: list[dict]) -> str:
    est = ("| px | gradient checkpointing | autocast float32 list | traced peak, GiB (in) "
           "| forward / backward / optimiser-step peaks, GiB "
           "| + full text cache | **GPU estimate, AdamW** | with 8-bit AdamW instead | **GPU estimate, 8-bit AdamW** "
           f"| fits {CARD_GIB} GiB (AdamW / 8-bit)? |\n|---:|---|---|---:|---|---:|---:|---:|---:|---|\n")
    cat = ("| px | gradient checkpointing | autocast float32 list | frozen weights (UNet, VAE, text encoders; bf16) "
           "| LoRA factors + alphas (fp32) "
           "| gradients | activations | backward temporaries | AdamW state (fp32) | inputs | total |\n"
           "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    for r in runs:
        p, ph = r["peak"], r["phase_peaks"]
        lora = sum(n * s for n, s in r["trained"])
        cached, cached8 = p["total"] + text_cache_bytes(), with_adam8bit(r) + text_cache_bytes()
        fits = lambda b: "yes" if on_gpu(b) <= CARD_GIB * GIB else "no"  # noqa: E731
        ckpt = "on" if r["checkpointing"] else "off"
        phases = " / ".join(gib(ph[k]["total"]) if k in ph else "-" for k in ("forward", "backward", "optimiser step"))
        lists = "CUDA's" if r["cuda_lists"] else "CPU's"
        est += (f"| {r['px']} | {ckpt} | {lists} | {gib(p['total'])} ({r['peak_phase']}) | {phases} | {gib(cached)} "
                f"| **{gib(on_gpu(cached))}** | {gib(cached8)} | **{gib(on_gpu(cached8))}** | {fits(cached)} / {fits(cached8)} |\n")
        cat += (f"| {r['px']} | {ckpt} | {lists} | {gib(p['parameters'] + p.get('buffers', 0) - lora)} | {gib(lora)} "
                f"| {gib(p.get('gradients', 0))} | {gib(p.get('activations', 0))} | {gib(p.get('backward temporaries', 0))} "
                f"| {gib(p.get('optimiser state', 0))} | {gib(p.get('inputs', 0))} | {gib(p['total'])} |\n")
    return est + "\nThe traced peak by category (GiB):\n\n" + cat


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1024 px with checkpointing and the tiny checks only")
    ap.add_argument("--json", default=str(ROOT / "docs" / "sdxl-memory.json"), help="'' to write none")
    ap.add_argument("--base-precisions", default="", help="e.g. full,fp8,int8: only the 1024 px row (checkpointing, "
                    "CUDA's lists) for each model.base_precision, and the tiny model's real-vs-fake check of each; "
                    "the table on stdout, the runs in --json (default then docs/low-memory.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    say = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731  progress on stderr, the table on stdout
    if args.base_precisions:
        json_path = args.json if args.json != ap.get_default("json") else str(ROOT / "docs" / "low-memory.json")
        return precision_table(args.base_precisions.split(","), json_path, say, t0)

    # the SDXL table
    plan = [(1024, True, True)] if args.quick else [(512, True, True), (768, True, True), (1024, True, True),
                                                    (1024, True, False), (1024, False, True)]
    runs = []
    for px, ckpt, cuda_lists in plan:
        r = trace(SDXL_CONFIGS, px, sdxl_config(ckpt), fake=True, count_ops=(px == 1024 and ckpt and cuda_lists),
                  cuda_lists=cuda_lists)
        say(f"SDXL {px} px, checkpointing {ckpt}, CUDA lists {cuda_lists}: peak {gib(r['peak']['total'])} GiB "
            f"(build {r['build_seconds']:.0f} s, {r['step_seconds']:.0f} s per step)")
        runs.append(r)

    # validation on the tiny SDXL model
    from sdlora.model.tiny import TINY_SDXL_PROJECTION, TINY_SDXL_TE1, TINY_SDXL_TE2, make_tiny_sdxl

    with tempfile.TemporaryDirectory() as tmp:
        tiny = make_tiny_sdxl(Path(tmp) / "tiny")
        tiny_cfg = sdxl_config(True, {"lora": {"rank": 4, "alpha": 4}})
        kw = {"widths": (TINY_SDXL_TE1, TINY_SDXL_TE2), "pooled": TINY_SDXL_PROJECTION}
        real = trace(tiny, 128, tiny_cfg, fake=False, count_ops=True, profile_third=True, **kw)
        fake = trace(tiny, 128, tiny_cfg, fake=True, count_ops=True, **kw)
    say("tiny real", real["peak"], "fake", fake["peak"])
    old = old_script_step_peak(128)
    say(f"old setting at 128 px, fake: {old:,} B above the step's start")

    main_run = next(r for r in runs if r["px"] == 1024 and r["checkpointing"] and r["cuda_lists"])
    lines = [f"Produced by `python3 benchmarks/sdxl_memory.py{' --quick' if args.quick else ''}` "
             f"({platform.machine()}, 1 thread, torch {torch.__version__}, {time.perf_counter() - t0:.0f} s).", "",
             sdxl_tables(runs),
             f"Trained: {sum(n for n, _ in main_run['trained']) / 1e6:.2f} M LoRA parameters "
             f"({len(main_run['trained'])} tensors); 8-bit AdamW state {gib(adam8bit_bytes(main_run['trained']))} GiB "
             f"(counted) in place of AdamW's {gib(main_run['peak'].get('optimiser state', 0))} GiB; text-encoder "
             f"output cache at its {DEFAULT_CAPACITY}-caption capacity {gib(text_cache_bytes())} GiB (counted).",
             f"Attention ops in the 1024 px step: {main_run['attention_ops']}.", "",
             "Validation on the tiny SDXL model at 128 px (two steps, rank 4; bytes):", "",
             "| category | real tensors | fake tensors |", "|---|---:|---:|"]
    for k in sorted(set(real["peak"]) | set(fake["peak"])):
        lines.append(f"| {k} | {real['peak'].get(k, 0):,} | {fake['peak'].get(k, 0):,} |")
    lines += ["", f"Attention ops, real: {real['attention_ops']}; fake: {fake['attention_ops']}.",
              f"Third real step, peak above its start: profiler {real['profiler_peak_above_start']:,} B, "
              f"MemTracker {real['tracker_peak_above_start']:,} B.",
              f"Old script's step (full SDXL UNet, 128 px, no optimiser): profiler on real tensors "
              f"{OLD_PROFILER_PEAK_GIB:.3f} GiB, MemTracker on fake tensors {old / GIB:.4f} GiB ({old:,} B) above "
              "the start."]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.json:
        def summary(r):  # the per-tensor sizes as totals
            return {**{k: v for k, v in r.items() if k != "trained"}, "trained_parameters": sum(n for n, _ in r["trained"]),
                    "trained_tensors": len(r["trained"]), "adam8bit_state_bytes": adam8bit_bytes(r["trained"])}

        atomic.write_json(args.json, {"command": f"python3 benchmarks/sdxl_memory.py{' --quick' if args.quick else ''}",
                                      "runs": [summary(r) for r in runs], "tiny_real": summary(real),
                                      "tiny_fake": summary(fake), "old_setting_fake_bytes": old,
                                      "text_cache_bytes": text_cache_bytes(),
                                      "assumptions": {"cuda_context_gib": CUDA_CONTEXT_GIB,
                                                      "fragmentation": FRAGMENTATION, "card_gib": CARD_GIB}})
    return 0


def precision_table(precisions: list[str], json_path: str, say, t0: float) -> int:
    """The 1024 px step (checkpointing, CUDA's float32 list) for each model.base_precision, beside the tiny model's
    real-against-fake check of the same precision."""
    from sdlora.model.tiny import TINY_SDXL_PROJECTION, TINY_SDXL_TE1, TINY_SDXL_TE2, make_tiny_sdxl

    runs, tiny_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tiny = make_tiny_sdxl(Path(tmp) / "tiny")
        kw = {"widths": (TINY_SDXL_TE1, TINY_SDXL_TE2), "pooled": TINY_SDXL_PROJECTION}
        for precision in precisions:
            model = {"model": {"path": "sdxl", "base_precision": precision}}
            cfg = sdxl_config(True, {**model, "lora": {"rank": 4, "alpha": 4}})
            r = trace(SDXL_CONFIGS, 1024, sdxl_config(True, model), fake=True)
            r["base_precision"] = precision
            say(f"SDXL 1024 px, base {precision}: peak {gib(r['peak']['total'])} GiB ({r['step_seconds']:.0f} s per "
                f"step): {r['peak']}")
            runs.append(r)
            real, fake = (trace(tiny, 128, cfg, fake=f, **kw) for f in (False, True))
            say(f"tiny, base {precision}: real {real['peak']}, fake {fake['peak']}")
            tiny_rows.append((precision, real["peak"], fake["peak"]))
    lines = [f"Produced by `python3 benchmarks/sdxl_memory.py --base-precisions {','.join(precisions)}` "
             f"({platform.machine()}, 1 thread, torch {torch.__version__}, {time.perf_counter() - t0:.0f} s).", "",
             "| model.base_precision | frozen weights, GiB | traced peak, GiB (in) | + full text cache, AdamW "
             "| **GPU estimate, AdamW** | with 8-bit AdamW | **GPU estimate, 8-bit AdamW** |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        p = r["peak"]
        frozen = p["parameters"] + p.get("buffers", 0) - sum(n * s for n, s in r["trained"])
        cached, cached8 = p["total"] + text_cache_bytes(), with_adam8bit(r) + text_cache_bytes()
        lines.append(f"| {r['base_precision']} | {gib(frozen)} | {gib(p['total'])} ({r['peak_phase']}) | {gib(cached)} "
                     f"| **{gib(on_gpu(cached))}** | {gib(cached8)} | **{gib(on_gpu(cached8))}** |")
    lines += ["", "Tiny SDXL model at 128 px, two steps, rank 4: real against fake tensors (bytes at the peak):", "",
              "| model.base_precision | category | real tensors | fake tensors |", "|---|---|---:|---:|"]
    for precision, real, fake in tiny_rows:
        for k in sorted(set(real) | set(fake)):
            lines.append(f"| {precision} | {k} | {real.get(k, 0):,} | {fake.get(k, 0):,} |")
    print("\n".join(lines))
    if json_path:
        atomic.write_json(json_path, {"command": f"python3 benchmarks/sdxl_memory.py --base-precisions "
                                                 f"{','.join(precisions)}",
                                      "runs": [{k: v for k, v in r.items() if k != "trained"} for r in runs],
                                      "tiny": [{"base_precision": a, "real": b, "fake": c} for a, b, c in tiny_rows]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
