"""Build sdlora-mini from scratch on CPU: VAE first, then text encoder + UNet together (docs/mini.md).

    python benchmarks/mini_build.py --out build/mini            # the shipped model (about an hour on 2 cores)
    python benchmarks/mini_build.py --out /tmp/m --preset check  # a few steps, end to end
    python benchmarks/mini_build.py --out build/mini --install   # also copy fp16 weights to sdlora/resources/mini

Deterministic from --seed (same torch build and thread count). Each phase is saved as it finishes
(vae/, then checkpoints of UNet + text encoder every --save-every steps; a rerun resumes from them),
and build.json records the seed, the data, the sizes, the steps, the losses and the seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sdlora.util.allocator import keep_freed_cpu_memory  # noqa: E402
from sdlora.mini import MINI_MODEL_DIR  # noqa: E402
from sdlora.mini.data import caption, digit_renders  # noqa: E402

PRESETS = {
    # the shipped model: the feasibility check
    "mini": dict(n_images=6000, vae_channels=(32, 64, 64), vae_steps=500, vae_batch=32, vae_lr=1e-3,
                 unet_channels=(64, 128), te_width=64, te_layers=2, steps=3000, batch=64, lr=5e-4,
                 caption_dropout=0.1, save_every=200, te_embed_std=0.5, jitter=3, min_snr_gamma=5.0),
    # a few steps of everything, to check the script end to end
    "check": dict(n_images=256, vae_channels=(32, 64, 64), vae_steps=5, vae_batch=32, vae_lr=1e-3,
                  unet_channels=(64, 128), te_width=64, te_layers=2, steps=6, batch=64, lr=5e-4,
                  caption_dropout=0.1, save_every=3, te_embed_std=0.5, jitter=3, min_snr_gamma=5.0),
}
CLIP_TOKENIZER = Path(__file__).resolve().parent.parent / "sdlora" / "resources" / "clip_tokenizer"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(CLIP_TOKENIZER / "vocab.json"), str(CLIP_TOKENIZER / "merges.txt"), model_max_length=77,
                         bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                         pad_token="<|endoftext|>")


def make_vae(channels):
    from diffusers import AutoencoderKL

    n = len(channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=16,
                         block_out_channels=tuple(channels), sample_size=32,
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n)


def make_text_encoder(tokenizer, width, layers, embed_std=None):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width,
                         num_hidden_layers=layers, num_attention_heads=max(1, width // 16), max_position_embeddings=77,
                         hidden_act="quick_gelu", projection_dim=width, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    te = CLIPTextModel(cfg)
    if embed_std is not None:  # token embeddings: see PRESETS["mini"]["te_embed_std"]
        torch.nn.init.normal_(te.get_input_embeddings().weight, std=embed_std)
    return te


def make_unet(channels, cross_dim, latent_side):
    from diffusers import UNet2DConditionModel

    n = len(channels)
    # cross-attention at the top level only (latent_side x latent_side), plain blocks below
    return UNet2DConditionModel(
        sample_size=latent_side, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=tuple(channels),
        norm_num_groups=32, down_block_types=("CrossAttnDownBlock2D",) + ("DownBlock2D",) * (n - 1),
        up_block_types=("UpBlock2D",) * (n - 1) + ("CrossAttnUpBlock2D",), cross_attention_dim=cross_dim,
        attention_head_dim=8)


def make_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def lr_at(step: int, total: int, base: float, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def train_vae(p, pixels, out: Path, seed: int, record: dict):
    from diffusers import AutoencoderKL

    if (out / "vae" / "config.json").is_file():
        log("VAE: found a finished one, reusing it")
        if (out / "vae_record.json").is_file():
            record.update(json.loads((out / "vae_record.json").read_text()))
        return AutoencoderKL.from_pretrained(out / "vae")
    torch.manual_seed(seed)
    vae = make_vae(p["vae_channels"])
    record["vae_params"] = n_params(vae)
    log(f"VAE: {record['vae_params'] / 1e6:.2f} M parameters, {p['vae_steps']} steps at batch {p['vae_batch']}")
    opt = torch.optim.AdamW(vae.parameters(), lr=p["vae_lr"], weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed + 1)
    t0, losses = time.perf_counter(), []
    vae.train()
    for step in range(p["vae_steps"]):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, p["vae_steps"], p["vae_lr"], warmup=20)
        idx = torch.randint(len(pixels), (p["vae_batch"],), generator=gen)
        x = pixels[idx]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        kl = post.kl().mean() / z[0].numel()
        loss = mse + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(mse.item())
        if step % 25 == 0 or step == p["vae_steps"] - 1:
            log(f"VAE step {step} mse {np.mean(losses[-25:]):.4f} ({time.perf_counter() - t0:.0f}s)")
    vae.eval()
    with torch.no_grad():  # SD's scaling factor: latents of unit variance
        std = torch.cat([vae.encode(pixels[i:i + 256]).latent_dist.mean for i in range(0, min(len(pixels), 2048), 256)]).std()
    vae.register_to_config(scaling_factor=float(1.0 / std))
    record["vae"] = {"steps": p["vae_steps"], "seconds": round(time.perf_counter() - t0, 1),
                     "final_mse": float(np.mean(losses[-25:])), "scaling_factor": float(1.0 / std)}
    vae.save_pretrained(out / "vae")
    (out / "vae_record.json").write_text(json.dumps({k: record[k] for k in ("vae", "vae_params")}))
    log(f"VAE saved: mse {record['vae']['final_mse']:.4f}, scaling factor {1 / std:.3f}")
    return vae


def digit_binding_probe(unet, te, ids, wrong_ids, lat_mean, acp, seed: int) -> float:
    """How much the digit word matters: the diffusion loss with a wrong digit word minus with the right one.

    A fixed batch of 64 training latents, fixed noise, t in {300, 500, 700}; positive (and growing) once the UNet
    reads the digit from the text, about 0 while only the colours are bound. Logged during the build.
    """
    g = torch.Generator().manual_seed(seed + 7)
    idx = torch.arange(min(64, len(ids)))
    z0 = lat_mean[idx]
    gaps = []
    with torch.no_grad():
        right, wrong = te(ids[idx]).last_hidden_state, te(wrong_ids[idx]).last_hidden_state
        for tv in (300, 500, 700):
            t = torch.full((len(idx),), tv)
            noise = torch.randn(z0.shape, generator=g)
            a = acp[t].view(-1, 1, 1, 1)
            zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
            gaps.append(F.mse_loss(unet(zt, t, encoder_hidden_states=wrong).sample, noise).item()
                        - F.mse_loss(unet(zt, t, encoder_hidden_states=right).sample, noise).item())
    return float(np.mean(gaps))


def train_unet_te(p, vae, pixels, captions, out: Path, seed: int, record: dict, max_seconds: float | None = None,
                  wrong_captions=None):
    tokenizer = make_tokenizer()
    torch.manual_seed(seed + 2)
    te = make_text_encoder(tokenizer, p["te_width"], p["te_layers"], p.get("te_embed_std"))
    unet = make_unet(p["unet_channels"], p["te_width"], pixels.shape[-1] // 2 ** (len(p["vae_channels"]) - 1))
    record["unet_params"], record["text_encoder_params"] = n_params(unet), n_params(te)
    log(f"UNet {n_params(unet) / 1e6:.2f} M, text encoder {n_params(te) / 1e6:.2f} M parameters; "
        f"{p['steps']} steps at batch {p['batch']}")
    with torch.no_grad():
        enc = [vae.encode(pixels[i:i + 256]).latent_dist for i in range(0, len(pixels), 256)]
        lat_mean = torch.cat([e.mean for e in enc]) * vae.config.scaling_factor
        lat_std = torch.cat([e.std for e in enc]) * vae.config.scaling_factor
    ids = tokenizer(list(captions), padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    wrong_ids = tokenizer(list(wrong_captions[:64]), padding="max_length", max_length=77, truncation=True,
                          return_tensors="pt").input_ids
    record.setdefault("digit_gap_every_250", [])
    sched = make_scheduler()
    acp = sched.alphas_cumprod
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=p["lr"], weight_decay=1e-2)
    gen = torch.Generator().manual_seed(seed + 3)
    start, losses, seconds = 0, [], 0.0
    ckpt = out / "unet_te_checkpoint.pt"
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)  # tensors and plain values only: never runs code
        unet.load_state_dict(state["unet"])
        te.load_state_dict(state["te"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        start, losses, seconds = state["step"], state["losses"], state["seconds"]
        log(f"resuming UNet + text encoder at step {start}")
    unet.train()
    te.train()
    t0 = time.perf_counter() - seconds
    for step in range(start, p["steps"]):
        if max_seconds and time.perf_counter() - t0 > max_seconds:
            log(f"stopping at step {step}: the --max-seconds budget ({max_seconds}s) is spent")
            record["stopped_early_at_step"] = step
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, p["steps"], p["lr"])
        idx = torch.randint(len(ids), (p["batch"],), generator=gen)
        tok = ids[idx].clone()
        drop = torch.rand(p["batch"], generator=gen) < p["caption_dropout"]
        tok[drop] = empty
        z0 = lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (p["batch"],), generator=gen)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        cond = te(tok).last_hidden_state
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        gamma = p.get("min_snr_gamma")
        if gamma:  # min-SNR-γ weighting for epsilon prediction, min(SNR, γ) / SNR (Hang et al., ICCV 2023)
            snr = (a / (1 - a)).flatten()
            per_sample = per_sample * snr.clamp(max=gamma) / snr
        loss = per_sample.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        done = step + 1
        if step % 25 == 0 or done == p["steps"]:
            el = time.perf_counter() - t0
            log(f"UNet+TE step {step} loss {np.mean(losses[-50:]):.4f} ({el:.0f}s, {el / (done - start or 1):.2f} s/step "
                f"this session)" if start else f"UNet+TE step {step} loss {np.mean(losses[-50:]):.4f} ({el:.0f}s, "
                f"{el / done:.2f} s/step)")
        if done % 250 == 0 or done == p["steps"]:
            unet.eval()
            gap = digit_binding_probe(unet, te, ids, wrong_ids, lat_mean, acp, seed)
            unet.train()
            record["digit_gap_every_250"].append([done, round(gap, 5)])
            log(f"digit binding at step {done}: loss(wrong digit word) - loss(right one) = {gap:+.5f}")
        if done % p["save_every"] == 0 or done == p["steps"]:
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"unet": unet.state_dict(), "te": te.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                        "step": done, "losses": losses, "seconds": time.perf_counter() - t0}, tmp)
            tmp.replace(ckpt)
    record["unet_te"] = {"steps": len(losses), "seconds": round(time.perf_counter() - t0, 1),
                         "final_loss": float(np.mean(losses[-100:])),
                         "loss_every_100": [round(float(np.mean(losses[i:i + 100])), 4) for i in range(0, len(losses), 100)]}
    return unet.eval(), te.eval(), tokenizer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="build folder (the diffusers model lands in OUT/model)")
    ap.add_argument("--preset", default="mini", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, help="override the preset's UNet + text encoder steps")
    ap.add_argument("--batch", type=int, help="override the preset's UNet + text encoder batch size")
    ap.add_argument("--max-seconds", type=float, help="stop the UNet + text encoder phase after this long (recorded)")
    ap.add_argument("--te-embed-std", type=float, help="override the token embeddings' initial std")
    ap.add_argument("--unet-channels", help="override, e.g. 128,256 (a bigger build on a GPU machine)")
    ap.add_argument("--install", action="store_true", help="copy the fp16 model to sdlora/resources/mini")
    args = ap.parse_args(argv)
    keep_freed_cpu_memory()
    torch.set_num_threads(args.threads)
    p = dict(PRESETS[args.preset])
    if args.steps:
        p["steps"] = args.steps
    if args.batch:
        p["batch"] = args.batch
    if args.te_embed_std:
        p["te_embed_std"] = args.te_embed_std
    if args.unet_channels:
        p["unet_channels"] = tuple(int(c) for c in args.unet_channels.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"command": " ".join(sys.argv), "preset": args.preset, "seed": args.seed, "threads": args.threads, "torch": torch.__version__,
              "params": {k: list(v) if isinstance(v, tuple) else v for k, v in p.items()},
              "data": f"sklearn load_digits, {p['n_images']} renders at 32 px (sdlora.mini.data.digit_renders, "
                      f"seed {args.seed}, centred with jitter {p.get('jitter')} px), held-out colour/digit pairs excluded"}
    t_all = time.perf_counter()
    images, labels, strokes, bgs, caps = digit_renders(p["n_images"], args.seed, jitter=p.get("jitter"))
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    log(f"data: {len(images)} renders, e.g. {caps[0]!r}")
    vae = train_vae(p, pixels, out, args.seed, record)
    vae.eval().requires_grad_(False)
    wrong = [caption(s, (int(l) + 1 + k % 9) % 10, b) for k, (s, l, b) in enumerate(zip(strokes, labels, bgs))]
    unet, te, tokenizer = train_unet_te(p, vae, pixels, caps, out, args.seed, record, args.max_seconds, wrong)
    record["seconds"] = round(time.perf_counter() - t_all, 1)
    save_model(out / "model", vae, unet, te, tokenizer)
    (out / "build.json").write_text(json.dumps(record, indent=1))
    log(f"model saved to {out / 'model'} ({record['seconds']}s in all, this session)")
    if args.install:
        install(out / "model", out / "build.json")
    return 0


def save_model(folder: Path, vae, unet, te, tokenizer) -> None:
    """A diffusers SD 1.x folder, weights in fp16 safetensors (loaders upcast with torch_dtype=float32)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tokenizer, unet=unet, scheduler=make_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16)
    pipe.save_pretrained(folder, safe_serialization=True)


def install(model: Path, build_json: Path) -> None:
    if MINI_MODEL_DIR.exists():
        shutil.rmtree(MINI_MODEL_DIR)
    shutil.copytree(model, MINI_MODEL_DIR)
    shutil.copy(build_json, MINI_MODEL_DIR / "build.json")
    log(f"installed into {MINI_MODEL_DIR}")


if __name__ == "__main__":
    sys.exit(main())
