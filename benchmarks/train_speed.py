"""Training-step speed and peak memory: sdlora against the floor (the frozen model's own passes) and the peer (peft).

Models have SD 1.5's architecture (configs from sdlora/resources/configs/sd_v1), or with `--family sdxl` SDXL base
1.0's (configs from sdlora/resources/configs/sdxl_base_v1-0: both text encoders, pooled embedding and
micro-conditioning), and random weights; nothing is downloaded. `--arch tiny` swaps in the test suite's tiny model
of the family (sdlora/model/tiny.py), to check the script end to end in seconds (its numbers mean nothing). All variants live in one process and share the frozen weights (deep copies whose memo maps
every frozen tensor to itself), and run interleaved, round by round, so machine drift hits all alike.

    python3 benchmarks/train_speed.py                  # CPU, 256 px, fp32 (about 10 min on 2 cores)
    python3 benchmarks/train_speed.py --quick          # smoke: 1 warm-up + 2 timed steps at 128 px
    python3 benchmarks/train_speed.py --device cuda --resolution 512 --dtype bf16
    python3 benchmarks/train_speed.py --family sdxl --device cuda --resolution 1024 --dtype bf16 --rank 32 --json x.json
    python3 benchmarks/train_speed.py --family sdxl --arch tiny --quick --doc ''   # smoke: tiny SDXL, seconds
    python3 benchmarks/train_speed.py --only sdlora --base-precisions fp8,int8 --dtype bf16   # a low-bit base

`--base-precisions fp8,int8[,int4]` adds a variant `sdlora+<precision>` per model.base_precision: the same LoRA step
with the frozen UNet's and text encoder's Linear / Conv2d weights stored in that form (sdlora/model/low_bits.py,
stored by place_models as in training; the variant's own copy of the modules, sharing the other frozen tensors),
and a column of each variant's paired ratio to `sdlora` (the base in --dtype). Its table goes to its own section of
the page (`<!-- table:cpu:base-precision -->`), so it never replaces the main table.

SDXL: the frozen weights are 3.5 B parameters (14 GB in fp32, 7 GB in bf16), shared by every variant; each
step's activations come on top and grow with the resolution (on CPU, prefer --resolution 256 or below).

Timing: warm-up rounds first (the default 4 show each of the four captions once, so the penalty's base
norms are cached, as they are from the second epoch on), then timed rounds; each round runs every variant
once on the same batch, starting from a different variant each round, with Python's garbage collector run
before and held off during each step. On CPU the allocator keeps freed memory, as the trainer does
(sdlora/allocator.py). Ratios are paired: each round's time is divided by the reference's time in the same
round, and the table gives the median of those ratios, so a slow round slows the reference too.

Peak memory per variant: the peak of memory allocated during one step above what was allocated before it
(on GPU torch.cuda.max_memory_allocated; on CPU the profiler's allocation record, the same quantity:
torch.profiler with profile_memory=True, measured in one extra round after the timed ones), plus the
variant's persistent adapter state (LoRA factors and the optimiser's state; the gradients are allocated and
freed within the step, so they are in its peak). The frozen weights are shared and not counted.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from sdlora.util import atomic  # noqa: E402
from sdlora.util.allocator import keep_freed_cpu_memory  # noqa: E402
from sdlora.config import validate  # noqa: E402
from sdlora.reg.embedding_norm import EmbeddingNormRegulariser  # noqa: E402
from sdlora.training.losses import diffusion_loss, diffusion_target, sample_noise  # noqa: E402
from sdlora.lora import build_param_groups, inject_all  # noqa: E402
from sdlora.data.pipeline import conditioning_fields  # noqa: E402
from sdlora.model.components import Components  # noqa: E402
from sdlora.model.families import family_named  # noqa: E402
from sdlora.training.optim import make_optimizer  # noqa: E402
from sdlora.training.placement import place_models  # noqa: E402
from speed_report import Result, summary, table, write_doc  # noqa: E402  (benchmarks/speed_report.py)

CONFIGS = {"sd1": ROOT / "sdlora" / "resources" / "configs" / "sd_v1",
           "sdxl": ROOT / "sdlora" / "resources" / "configs" / "sdxl_base_v1-0"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RANK = 16  # the default; --rank sets another (SDXL's usual: 32)


# ---------------------------------------------------------------------------------------------- models
def build_base(family: str, arch: str = "full") -> Components:
    """The frozen model of `family` (sd1 | sdxl) with random weights: the real architecture from the bundled configs,
    or (`arch` tiny) the test suite's tiny model. Tokenizers are not needed (batches are token ids)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    if arch == "tiny":
        from sdlora.model.loading import load_components
        from sdlora.model.tiny import make_tiny_model, make_tiny_sdxl

        folder = Path(tempfile.mkdtemp(prefix="train_speed_tiny_")) / "model"
        comps = load_components(str(make_tiny_sdxl(folder) if family == "sdxl" else make_tiny_model(folder)))
    else:
        configs = CONFIGS[family]
        encoders = {"text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(configs / "text_encoder"))}
        if family == "sdxl":
            encoders["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(configs / "text_encoder_2"))
        models = {"unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet")),
                  "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae")), **encoders}
        comps = Components(family_named(family), models, dict.fromkeys(encoders),
                           DDPMScheduler.from_config(DDPMScheduler.load_config(configs / "scheduler")),
                           f"random {family}")
    for m in (comps.unet, comps.vae, *comps.text_encoders.values()):
        m.requires_grad_(False)
    return comps


def shared_copy(model):
    """A deep copy that shares every parameter and buffer with `model` (no extra weight memory)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def make_cfg(rank=RANK, base_precision="full", **train):
    return validate({"model": {"path": "-", "base_precision": base_precision}, "data": {"path": "-"},
                     "output": {"dir": "-"},
                     "lora": {"rank": rank, "alpha": rank}, "train": {"seed": 0, **train},
                     "reg": {"embedding_norm": {"weight": 0.1}}, "log": {"tracker": "none"}})


# -------------------------------------------------------------------------------------------- variants
class Variant:
    def __init__(self, name, step, adapter_params=(), optimizer=None):
        self.name, self.step, self.optimizer = name, step, optimizer
        self.adapter_params = list(adapter_params)
        self.seconds: list[float] = []
        self.peak_bytes = 0
        self.own_cost = None  # the penalty variant: times the penalty's own work alone (penalty_seconds)

    def persistent_bytes(self) -> int:
        n = sum(p.numel() * p.element_size() for p in self.adapter_params)  # gradients: in the step's peak
        if self.optimizer is not None:
            n += sum(t.numel() * t.element_size() for s in self.optimizer.state.values() for t in s.values()
                     if torch.is_tensor(t))
        return n


def lora_step(unet, encoders, family, optimizer, params, scheduler, cfg, batch, gen, autocast, *, vae=None,
              regulariser=None, train_text=True):
    """One training step as the trainer takes it (sdlora's losses, the family's text encoding and conditioning,
    sdlora's optimiser)."""
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
        emb = family.encode(encoders, batch.ids)
    with autocast():
        pred = unet(noisy, t, **family.unet_kwargs(emb, batch.cond)).sample
    loss = diffusion_loss(pred, diffusion_target(scheduler, latents, noise, t), t, scheduler, cfg.loss)
    if regulariser is not None:
        loss = loss + cfg.reg.embedding_norm.weight * regulariser(batch.ids, emb).penalty
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def penalty_seconds(regulariser, text_encoder, family, batch, repeats: int = 20) -> float:
    """The penalty's own work in a step, timed alone: cached base norms, the penalty, its backward to the
    embeddings (median of `repeats`). The step's other work is the same with the penalty on or off."""
    with torch.no_grad():
        emb = family.encode([text_encoder], batch.ids)
    times = []
    for _ in range(repeats):
        leaf = emb.detach().requires_grad_(True)
        t0 = time.perf_counter()
        regulariser(batch.ids, leaf).penalty.backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def floor_step(unet, encoders, family, scheduler, cfg, batch, gen, autocast, *, text_backward=False):
    """The frozen model's own work: text-encoder forward, UNet forward and backward to its input."""
    latents = batch.latents
    noise = sample_noise(latents, 0.0, gen)
    t = torch.randint(0, 1000, (latents.shape[0],), generator=gen, device=latents.device)
    noisy = scheduler.add_noise(latents, noise, t).requires_grad_(True)
    with torch.set_grad_enabled(text_backward):
        emb = family.encode(encoders, batch.ids)
    with autocast():
        pred = unet(noisy, t, **family.unet_kwargs(emb, batch.cond)).sample
    diffusion_loss(pred, diffusion_target(scheduler, latents, noise, t), t, scheduler, cfg.loss).backward()


SD1_ONLY = ("sdlora+penalty",)  # the benchmark's penalty variant measures SD 1.5's one-encoder penalty


def build_variants(base: Components, device, dtype, autocast, only, rank: int = RANK, precisions=()):
    unet0, vae, scheduler, family = base.unet, base.vae, base.noise_scheduler, base.family
    encoders0 = list(base.text_encoders.values())
    # The penalty's content mask reads the EOS of make_batch's ids (SD 1.5's 49407; its text-encoder config says 2)
    tokenizer = SimpleNamespace(eos_token_id=encoders0[0].config.vocab_size - 1, model_max_length=77)
    gen = torch.Generator(device=device).manual_seed(0)
    variants = []

    def sdlora_variant(name, cfg, **kw):
        unet, encoders = shared_copy(unet0), {n: shared_copy(te) for n, te in base.text_encoders.items()}
        layers = inject_all({"unet": unet, **encoders}, cfg, family)
        comps = dataclasses.replace(base, models={**base.models, "unet": unet, **encoders})
        place_models(comps, layers, device, dtype, cfg)
        groups = build_param_groups(layers, cfg, family)
        opt = make_optimizer(groups.groups, cfg)
        params = [p for g in groups.groups for p in g["params"]]
        te = list(encoders.values())
        reg = EmbeddingNormRegulariser(te[0], tokenizer, cfg, family=family, output="text_encoder") if kw.pop("penalty", False) else None
        step = lambda b: lora_step(unet, te, family, opt, params, scheduler, cfg, b, gen, autocast,  # noqa: E731
                                   regulariser=reg, **kw)
        variant = Variant(name, step, params, opt)
        if reg is not None:
            variant.own_cost = lambda b: penalty_seconds(reg, te[0], family, b)
        return variant

    cfg = make_cfg(rank)
    wanted = lambda n: (only is None or n in only) and (family.name == "sd1" or n not in SD1_ONLY)  # noqa: E731
    if wanted("floor"):
        variants.append(Variant("floor", lambda b: floor_step(unet0, encoders0, family, scheduler, cfg, b, gen, autocast)))
    if wanted("floor+te_bwd"):
        variants.append(Variant("floor+te_bwd", lambda b: floor_step(unet0, encoders0, family, scheduler, cfg, b, gen,
                                                                     autocast, text_backward=True)))
    if wanted("sdlora"):
        variants.append(sdlora_variant("sdlora", cfg))
    if wanted("sdlora+penalty"):
        variants.append(sdlora_variant("sdlora+penalty", cfg, penalty=True))
    if wanted("peer"):
        variants.append(peer_variant(base, cfg, gen, device, dtype, autocast, rank))
    if wanted("sdlora+vae"):
        variants.append(sdlora_variant("sdlora+vae", cfg, vae=vae))
    if wanted("sdlora+ckpt"):
        variants.append(sdlora_variant("sdlora+ckpt", make_cfg(rank, gradient_checkpointing=True)))
    for precision in precisions:  # a low-bit base: place_models stores the copy's weights (model.base_precision)
        variants.append(sdlora_variant(f"sdlora+{precision}", make_cfg(rank, base_precision=precision)))
    return variants


def peer_variant(base: Components, cfg, gen, device, dtype, autocast, rank: int = RANK):
    """What diffusers' LoRA training examples do (train_text_to_image_lora.py; for SDXL train_dreambooth_lora_sdxl.py
    with --train_text_encoder: both encoders): peft adapters via add_adapter on the same targets, the LoRA weights
    cast to fp32 (their cast_training_params), one optimiser over UNet and text-encoder parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    unet, encoders = shared_copy(base.unet), [shared_copy(te) for te in base.text_encoders.values()]
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True,
                                target_modules=list(cfg.lora.unet_targets)))
    for te in encoders:  # transformers' add_adapter is this call (transformers 5's asks for peft >= 0.22 first)
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True,
                                           target_modules=list(cfg.lora.text_encoder_targets)), te)
    for m in (unet, *encoders):
        m.to(device=device, dtype=dtype)
        for p in m.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        m.train()
    u = [p for p in unet.parameters() if p.requires_grad]
    t = [p for te in encoders for p in te.parameters() if p.requires_grad]
    groups = [{"params": u, "lr": cfg.optim.lr, "weight_decay": 0.0, "name": "unet"},
              {"params": t, "lr": cfg.optim.lr, "weight_decay": 0.0, "name": "text_encoders"}]
    opt = make_optimizer(groups, cfg)
    step = lambda b: lora_step(unet, encoders, base.family, opt, u + t, base.noise_scheduler, cfg, b, gen, autocast)  # noqa: E731
    return Variant("peer", step, u + t, opt)


# ----------------------------------------------------------------------------------------- measurement
def cpu_peak_bytes(step, batch) -> int:
    """Peak bytes allocated during step(batch) above what was allocated before it, from the profiler's record."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(batch)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    return max([0] + [e["args"]["Total Allocated"] for e in memory])  # the running total starts at 0


def timed(variant, batch, device) -> None:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter()
        variant.step(batch)
        if cuda:
            torch.cuda.synchronize()
        variant.seconds.append(time.perf_counter() - t0)
    finally:
        gc.enable()
    if cuda:
        variant.peak_bytes = max(variant.peak_bytes, torch.cuda.max_memory_allocated() - before)


def run_rounds(variants, base, args, device, dtype, say, batch_of=None) -> None:
    """Warm-up then timed rounds (module docstring), then on CPU a memory round; `batch_of(base, resolution, device,
    dtype, i)` makes round i's batch (default `make_batch`; benchmarks/sd3_speed.py passes its own)."""
    make_batch_ = batch_of or make_batch
    for i in range(args.warmup + args.steps):
        batch = make_batch_(base, args.resolution, device, dtype, i)
        for v in variants[i % len(variants):] + variants[:i % len(variants)]:  # each round starts elsewhere
            timed(v, batch, device)
            if i < args.warmup:
                v.seconds.clear()
                v.peak_bytes = 0
        say(f"round {i}: " + ", ".join(f"{v.name} {v.seconds[-1]:.2f}s" for v in variants if v.seconds))
    if device.type == "cpu":
        batch = make_batch_(base, args.resolution, device, dtype, args.warmup + args.steps)
        for v in variants:
            v.peak_bytes = cpu_peak_bytes(v.step, batch)
        say("memory round: " + ", ".join(f"{v.name} {v.peak_bytes / 2**20:.0f} MiB" for v in variants))


def isolated_costs(variants, base, args, device, dtype) -> str:
    """A line per variant that can time its own extra work alone (the penalty), against the sdlora step."""
    by = {v.name: v for v in variants}
    lines = []
    for v in variants:
        if v.own_cost is None:
            continue
        seconds = v.own_cost(make_batch(base, args.resolution, device, dtype, 0))  # a caption seen in the warm-up
        ref = by.get("sdlora")
        share = f" = {seconds / statistics.median(ref.seconds):.4f} of the sdlora step" if ref else ""
        lines.append(f"- {v.name}: the penalty's own work (cached base norms, penalty, backward to the embeddings), "
                     f"timed alone: {seconds * 1e3:.2f} ms{share}")
    return "\n".join(lines)


def make_batch(base: Components, resolution, device, dtype, i):
    """Batch 1: one caption's token ids per text encoder (BOS, 7-10 random tokens, EOS, padding: EOS for CLIP-L,
    id 0 ("!") for SDXL's second encoder), an image or its latents, and SDXL's micro-conditioning of an uncropped
    square (other families ignore it)."""
    g = torch.Generator().manual_seed(1000 + i % 4)  # four distinct captions: the penalty's cache warms up
    vocab = base.text_encoder.config.vocab_size
    bos, eos = vocab - 2, vocab - 1  # CLIP's <|startoftext|>, <|endoftext|> (49406, 49407 at full size)
    n = 8 + i % 4
    content = torch.randint(0, vocab - 2, (n - 1,), generator=g)
    ids = []
    for pad in [eos, 0][:len(base.text_encoders)]:
        row = torch.full((1, 77), pad)
        row[0, 0], row[0, 1:n], row[0, n] = bos, content, eos
        ids.append(row.to(device))
    return SimpleNamespace(
        ids=ids, cond=conditioning_fields(["caption"], [((resolution, resolution), (0, 0), (resolution, resolution))]),
        pixels=(torch.rand(1, 3, resolution, resolution, generator=g) * 2 - 1).to(device, dtype),
        latents=torch.randn(1, 4, resolution // 8, resolution // 8, generator=g).to(device, dtype))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (timings between torch.cuda.synchronize calls)")
    p.add_argument("--family", default="sd1", choices=["sd1", "sdxl"], help="the architecture measured (default sd1)")
    p.add_argument("--arch", default="full", choices=["full", "tiny"],
                   help="full: the real architecture (random weights); tiny: the test suite's tiny model, a smoke run")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--rank", type=int, default=RANK, help=f"LoRA rank = alpha, sdlora and the peer (default {RANK})")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--only", nargs="*", help="variants to run (default: all)")
    p.add_argument("--base-precisions", default="", help="e.g. fp8,int8: add an sdlora variant per low-bit base "
                   "(model.base_precision), with ratios to the sdlora variant; int8/int4 need optimum-quanto")
    p.add_argument("--quick", action="store_true", help="smoke run: 128 px, 1 warm-up, 2 timed rounds")
    p.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"), help="page to write the table into ('' = none)")
    p.add_argument("--json", default="", help="also write the numbers as JSON here (what summary() returns)")
    args = p.parse_args(argv)
    if args.quick:
        args.resolution, args.warmup, args.steps = 128, 1, 2
    from sdlora.model.low_bits import BASE_PRECISIONS, library_missing

    args.base_precisions = [x for x in args.base_precisions.split(",") if x]
    for x in args.base_precisions:
        if x not in BASE_PRECISIONS[1:]:
            p.error(f"--base-precisions: {x!r} is not one of {', '.join(BASE_PRECISIONS[1:])}")
        if missing := library_missing(x):
            p.error(missing)
    if args.base_precisions and args.only is not None and "sdlora" not in args.only:
        p.error("--base-precisions compares against the sdlora variant: keep it in --only")
    return args


def measure(args, say=print) -> dict:
    """Build the variants, run the rounds; returns {"table", "variants": summary(), "settings", "seconds"}."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if device.type in ("cpu", "cuda") and dtype != torch.float32:
        autocast = lambda: torch.autocast(device.type, dtype=dtype)  # noqa: E731
    else:
        import contextlib

        autocast = contextlib.nullcontext
    if device.type == "cpu":
        keep_freed_cpu_memory()  # as the trainer does on CPU (sdlora/allocator.py); the same for every variant
    t_start = time.perf_counter()
    base = build_base(args.family, args.arch)
    variants = build_variants(base, device, dtype, autocast, args.only, args.rank, args.base_precisions)  # LoRA injected on the CPU, as in
    for model in (base.unet, base.vae, *base.text_encoders.values()):  # the trainer; shared weights moved already
        model.to(device, dtype)  # (same Parameter objects); this moves the base's buffers
    built = time.perf_counter() - t_start
    say(f"built {len(variants)} variants in {built:.0f} s; "
        f"attention processor: {type(next(iter(base.unet.attn_processors.values()))).__name__}")
    run_rounds(variants, base, args, device, dtype, say=say)
    results = [Result(v.name, list(v.seconds), v.peak_bytes, v.persistent_bytes()) for v in variants]
    tbl = table(results, extra_ref="sdlora" if args.base_precisions else None)
    extra = isolated_costs(variants, base, args, device, dtype)
    if extra:
        tbl += "\n\n" + extra
    settings = {k: getattr(args, k) for k in ("device", "family", "arch", "resolution", "dtype", "rank", "warmup",
                                              "steps", "only", "base_precisions")}
    return {"table": tbl, "variants": summary(results), "settings": settings, "build_seconds": built,
            "seconds": time.perf_counter() - t_start,
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}


def main(argv=None) -> int:
    args = parse_args(argv)
    measured = measure(args, say=lambda line: print(line, flush=True))
    print(measured["table"])
    if args.doc:
        write_doc(Path(args.doc), measured["table"], args, torch.device(args.device), measured["seconds"])
    if args.json:
        atomic.write_json(Path(args.json), {k: v for k, v in measured.items() if k != "table"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
