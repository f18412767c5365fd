"""Training-step speed and peak memory: sdlora against the floor (the frozen model's own passes) and the peer (peft).

Models have SD 1.5's architecture (configs from sdlora/resources/configs/sd_v1) and random weights; nothing
is downloaded. All variants live in one process and share the frozen weights (deep copies whose memo maps
every frozen tensor to itself), and run interleaved, round by round, so machine drift hits all alike.

    python3 benchmarks/train_speed.py                  # CPU, 256 px, fp32 (about 10 min on 2 cores)
    python3 benchmarks/train_speed.py --quick          # smoke: 1 warm-up + 2 timed steps at 128 px
    python3 benchmarks/train_speed.py --device cuda --resolution 512 --dtype bf16

Peak memory per variant is the high-water mark during its step above the memory held just before the step
(CPU: VmHWM after resetting it through /proc/self/clear_refs, minus RSS before; GPU: max_memory_allocated
minus memory_allocated), plus the variant's persistent adapter state (LoRA factors, their gradients and the
optimiser state, counted exactly). The frozen weights are shared and not counted. On CPU the script
re-executes itself with a fixed glibc mmap threshold so that freed activations return to the OS and RSS is
a true measure (the same for every variant).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from sdlora import atomic  # noqa: E402
from sdlora.config import validate  # noqa: E402
from sdlora.embedding_norm import EmbeddingNormRegulariser  # noqa: E402
from sdlora.losses import diffusion_loss, diffusion_target, sample_noise  # noqa: E402
from sdlora.lora import build_param_groups, inject_all  # noqa: E402
from sdlora.models import Components  # noqa: E402
from sdlora.optim import make_optimizer  # noqa: E402
from sdlora.text import encode  # noqa: E402
from sdlora.trainer import place_models  # noqa: E402

CONFIGS = ROOT / "sdlora" / "resources" / "configs" / "sd_v1"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RANK = 16


# ---------------------------------------------------------------------------------------------- models
def build_base(device, dtype):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIGS / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIGS / "vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(CONFIGS / "text_encoder"))
    scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(CONFIGS / "scheduler"))
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
    return unet, vae, text_encoder, scheduler


def shared_copy(model):
    """A deep copy that shares every parameter and buffer with `model` (no extra weight memory)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def make_cfg(**train):
    return validate({"model": {"path": "-"}, "data": {"path": "-"}, "output": {"dir": "-"},
                     "lora": {"rank": RANK, "alpha": RANK}, "train": {"seed": 0, **train},
                     "reg": {"embedding_norm": {"weight": 0.1}}, "log": {"tracker": "none"}})


# -------------------------------------------------------------------------------------------- variants
class Variant:
    def __init__(self, name, step, adapter_params=(), optimizer=None):
        self.name, self.step, self.optimizer = name, step, optimizer
        self.adapter_params = list(adapter_params)
        self.seconds: list[float] = []
        self.peak_bytes = 0

    def persistent_bytes(self) -> int:
        n = sum(p.numel() * p.element_size() * 2 for p in self.adapter_params)  # factor + its gradient
        if self.optimizer is not None:
            n += sum(t.numel() * t.element_size() for s in self.optimizer.state.values() for t in s.values()
                     if torch.is_tensor(t))
        return n


def lora_step(unet, text_encoder, optimizer, params, scheduler, cfg, batch, gen, autocast, *, vae=None,
              regulariser=None, train_text=True):
    """One training step as the trainer takes it (sdlora's losses, text encoding and optimiser)."""
    if vae is not None:
        with torch.no_grad():
            dist = vae.encode(batch.pixels).latent_dist
            latents = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen, device=dist.mean.device,
                                                          dtype=dist.mean.dtype)) * vae.config.scaling_factor
    else:
        latents = batch.latents
    noise = sample_noise(latents, 0.0, gen)
    t = torch.randint(0, 1000, (latents.shape[0],), generator=gen, device=latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    with torch.set_grad_enabled(train_text):
        emb = encode(text_encoder, batch.ids)
    with autocast():
        pred = unet(noisy, t, emb).sample
    loss = diffusion_loss(pred, diffusion_target(scheduler, latents, noise, t), t, scheduler, cfg.loss)
    if regulariser is not None:
        loss = loss + cfg.reg.embedding_norm.weight * regulariser(batch.ids, emb).penalty
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def floor_step(unet, text_encoder, scheduler, cfg, batch, gen, autocast, *, text_backward=False):
    """The frozen model's own work: text-encoder forward, UNet forward and backward to its input."""
    latents = batch.latents
    noise = sample_noise(latents, 0.0, gen)
    t = torch.randint(0, 1000, (latents.shape[0],), generator=gen, device=latents.device)
    noisy = scheduler.add_noise(latents, noise, t).requires_grad_(True)
    with torch.set_grad_enabled(text_backward):
        emb = encode(text_encoder, batch.ids)
    with autocast():
        pred = unet(noisy, t, emb).sample
    diffusion_loss(pred, diffusion_target(scheduler, latents, noise, t), t, scheduler, cfg.loss).backward()


def build_variants(base, device, dtype, autocast, only):
    unet0, vae, te0, scheduler = base
    tokenizer = SimpleNamespace(eos_token_id=49407)  # the SD 1.5 tokenizer's; its config says 2
    gen = torch.Generator(device=device).manual_seed(0)
    variants = []

    def sdlora_variant(name, cfg, **kw):
        unet, te = shared_copy(unet0), shared_copy(te0)
        layers = inject_all(unet, te, cfg)
        comps = Components(unet, vae, te, tokenizer, scheduler, "random SD 1.5")
        place_models(comps, layers, device, dtype, cfg)
        groups = build_param_groups(layers, cfg)
        opt = make_optimizer(groups.groups, cfg)
        params = [p for g in groups.groups for p in g["params"]]
        reg = EmbeddingNormRegulariser(te, tokenizer, cfg) if kw.pop("penalty", False) else None
        step = lambda b: lora_step(unet, te, opt, params, scheduler, cfg, b, gen, autocast, regulariser=reg, **kw)  # noqa: E731
        return Variant(name, step, params, opt)

    cfg = make_cfg()
    wanted = lambda n: only is None or n in only  # noqa: E731
    if wanted("floor"):
        variants.append(Variant("floor", lambda b: floor_step(unet0, te0, scheduler, cfg, b, gen, autocast)))
    if wanted("floor+te_bwd"):
        variants.append(Variant("floor+te_bwd", lambda b: floor_step(unet0, te0, scheduler, cfg, b, gen, autocast,
                                                                     text_backward=True)))
    if wanted("sdlora"):
        variants.append(sdlora_variant("sdlora", cfg))
    if wanted("sdlora+penalty"):
        variants.append(sdlora_variant("sdlora+penalty", cfg, penalty=True))
    if wanted("peer"):
        variants.append(peer_variant(unet0, te0, scheduler, cfg, gen, device, dtype, autocast))
    if wanted("sdlora+vae"):
        variants.append(sdlora_variant("sdlora+vae", cfg, vae=vae))
    if wanted("sdlora+ckpt"):
        variants.append(sdlora_variant("sdlora+ckpt", make_cfg(gradient_checkpointing=True)))
    return variants


def peer_variant(unet0, te0, scheduler, cfg, gen, device, dtype, autocast):
    """What diffusers' LoRA training examples do: peft adapters via add_adapter, LoRA weights cast to fp32."""
    from peft import LoraConfig

    unet, te = shared_copy(unet0), shared_copy(te0)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights=True,
                                target_modules=list(cfg.lora.unet_targets)))
    te.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights=True,
                              target_modules=list(cfg.lora.text_encoder_targets)))
    for m in (unet, te):
        m.to(device=device, dtype=dtype)
        for p in m.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    unet.train()
    te.train()
    u = [p for p in unet.parameters() if p.requires_grad]
    t = [p for p in te.parameters() if p.requires_grad]
    groups = [{"params": u, "lr": cfg.optim.lr, "weight_decay": 0.0, "name": "unet"},
              {"params": t, "lr": cfg.optim.lr, "weight_decay": 0.0, "name": "text_encoder"}]
    opt = make_optimizer(groups, cfg)
    step = lambda b: lora_step(unet, te, opt, u + t, scheduler, cfg, b, gen, autocast)  # noqa: E731
    return Variant("peer", step, u + t, opt)


# ----------------------------------------------------------------------------------------- measurement
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def timed(variant, batch, device) -> None:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = rss_bytes()
        reset_hwm()
    t0 = time.perf_counter()
    variant.step(batch)
    if cuda:
        torch.cuda.synchronize()
    variant.seconds.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if cuda else hwm_bytes()) - before
    variant.peak_bytes = max(variant.peak_bytes, peak)


def make_batch(resolution, device, dtype, i):
    g = torch.Generator().manual_seed(1000 + i % 4)  # four distinct captions: the penalty's cache warms up
    ids = torch.full((1, 77), 49407)
    n = 8 + i % 4
    ids[0, 0] = 49406
    ids[0, 1:n] = torch.randint(0, 49405, (n - 1,), generator=g)
    return SimpleNamespace(
        ids=ids.to(device),
        pixels=(torch.rand(1, 3, resolution, resolution, generator=g) * 2 - 1).to(device, dtype),
        latents=torch.randn(1, 4, resolution // 8, resolution // 8, generator=g).to(device, dtype))


# ---------------------------------------------------------------------------------------------- report
def table(variants) -> str:
    by = {v.name: v for v in variants}
    med = {v.name: statistics.median(v.seconds) for v in variants}
    mib = {v.name: (v.peak_bytes + v.persistent_bytes()) / 2**20 for v in variants}
    rows = ["| variant | s/step (median) | x floor | x peer | peak MiB | MiB x peer |", "|---|---|---|---|---|---|"]
    for name in by:
        xf = f"{med[name] / med['floor']:.3f}" if "floor" in med else "-"
        xp = f"{med[name] / med['peer']:.3f}" if "peer" in med else "-"
        mp = f"{mib[name] / mib['peer']:.3f}" if "peer" in mib else "-"
        rows.append(f"| {name} | {med[name]:.3f} | {xf} | {xp} | {mib[name]:.0f} | {mp} |")
    return "\n".join(rows)


def write_doc(path: Path, tbl: str, args, device, steps_s) -> None:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "none"
    section = (f"## {device.type.upper()}, {args.resolution} px, {args.dtype}, batch 1\n\n"
               f"Command: `python3 benchmarks/train_speed.py {' '.join(sys.argv[1:])}`  \n"
               f"Machine: {cpu}, {torch.get_num_threads()} threads, GPU: {gpu}; torch {torch.__version__}  \n"
               f"Date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; {args.warmup} warm-up + {args.steps}"
               f" timed rounds; run took {steps_s:.0f} s\n\n{tbl}\n")
    marker = f"<!-- table:{device.type} -->"
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    if marker in old:  # replace this device's table, keep the rest of the page
        head, _, rest = old.partition(marker)
        tail = rest.partition("<!-- /table -->")[2]
        text = f"{head}{marker}\n{section}<!-- /table -->{tail}"
    else:
        text = old.rstrip() + f"\n\n{marker}\n{section}<!-- /table -->\n"
    atomic.write_text(path, text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--only", nargs="*", help="variants to run (default: all)")
    p.add_argument("--quick", action="store_true", help="smoke run: 128 px, 1 warm-up, 2 timed rounds")
    p.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"), help="page to write the table into ('' = none)")
    args = p.parse_args(argv)
    if args.quick:
        args.resolution, args.warmup, args.steps = 128, 1, 2
    device = torch.device(args.device)
    if device.type == "cpu" and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    dtype = DTYPES[args.dtype]
    if device.type == "cpu" and dtype != torch.float32:
        autocast = lambda: torch.autocast("cpu", dtype=dtype)  # noqa: E731
    elif device.type == "cuda" and dtype != torch.float32:
        autocast = lambda: torch.autocast("cuda", dtype=dtype)  # noqa: E731
    else:
        import contextlib

        autocast = contextlib.nullcontext
    t_start = time.perf_counter()
    base = build_base(device, dtype)
    variants = build_variants(base, device, dtype, autocast, args.only)  # LoRA is injected on the CPU, as in the trainer
    for model in base[:3]:  # shared weights moved already (same Parameter objects); this moves the base's buffers
        model.to(device, dtype)
    print(f"built {len(variants)} variants in {time.perf_counter() - t_start:.0f} s; "
          f"attention processor: {type(next(iter(base[0].attn_processors.values()))).__name__}", flush=True)
    for i in range(args.warmup + args.steps):
        batch = make_batch(args.resolution, device, dtype, i)
        for v in variants:
            timed(v, batch, device)
            if i < args.warmup:
                v.seconds.clear()
                v.peak_bytes = 0
        print(f"round {i}: " + ", ".join(f"{v.name} {v.seconds[-1]:.2f}s" for v in variants if v.seconds), flush=True)
    tbl = table(variants)
    print(tbl)
    if args.doc:
        write_doc(Path(args.doc), tbl, args, device, time.perf_counter() - t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
