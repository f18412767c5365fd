"""The training loop. Set-up, loop, export: helpers carry the detail, this file carries the story."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import atomic
from .config import Config, dump_yaml
from .errors import UserError
from .export import export_adapter
from .losses import diffusion_loss, diffusion_target, sample_noise
from .lora import build_param_groups, inject_all, trainable_count
from .lora.layers import LoRALayer
from .models import Components, load_components
from .optim import make_lr_scheduler, make_optimizer
from .probe import DriftProbe
from .text import encode, tokenize

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainResult:
    out_dir: Path
    adapter_path: Path | None
    components: Components
    layers: dict[str, LoRALayer]
    losses: list[float] = field(default_factory=list)
    step: int = 0


def train(cfg: Config, *, overwrite: bool = False, dry_run: bool = False, log=print) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    out = Path(cfg.output.dir)
    if not dry_run:
        claim_output_dir(out, overwrite=overwrite)
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        log_with=None if cfg.log.tracker == "none" or dry_run else cfg.log.tracker,
        project_dir=str(out / "logs"),
    )
    main = accelerator.is_main_process
    say = log if main else (lambda *a, **k: None)
    set_seed(cfg.train.seed)

    # ---- model and adapters
    comps = load_components(cfg.model.path, vae_path=cfg.model.vae_path, config_dir=cfg.model.config_dir,
                            allow_pickle=cfg.model.allow_pickle)
    layers = inject_all(comps.unet, comps.text_encoder, cfg)
    groups = build_param_groups(layers, cfg)
    if dry_run:
        from .summary import plan_table

        say(plan_table(layers, groups, cfg))
        return TrainResult(out, None, comps, layers)
    say(f"sdlora: {len(layers)} adapted modules, {trainable_count(layers):,} trainable parameters")
    weight_dtype = WEIGHT_DTYPES[cfg.train.mixed_precision]
    place_models(comps, layers, accelerator.device, weight_dtype, cfg)

    # ---- data
    data = make_data(cfg, comps, accelerator, say)

    # ---- optimiser and schedule
    optimizer = make_optimizer(groups.groups, cfg)
    lr_scheduler = make_lr_scheduler(optimizer, cfg)
    trained = [comps.unet] + ([comps.text_encoder] if cfg.text_encoder.train else [])
    # The LR schedule is stepped here once per optimiser step (Accelerate's wrapper would step it once
    # per process under data parallelism).
    prepared = accelerator.prepare(*trained, optimizer)  # the data is sharded by sdlora.data, not by Accelerate
    unet = prepared[0]
    text_encoder = prepared[1] if cfg.text_encoder.train else comps.text_encoder
    optimizer = prepared[-1]

    if main:
        atomic.write_text(out / "config.yaml", dump_yaml(cfg))
        if accelerator.trackers:
            accelerator.init_trackers("sdlora", config=tracker_hparams(cfg))
    noise_gen = torch.Generator(device=accelerator.device).manual_seed(cfg.train.seed + accelerator.process_index)
    scheduler = comps.noise_scheduler
    t_max = cfg.loss.max_timestep or scheduler.config.num_train_timesteps
    params = [p for g in groups.groups for p in g["params"]]
    regulariser = make_regulariser(cfg, text_encoder, comps.tokenizer, say)
    probe = DriftProbe(text_encoder, comps.tokenizer, cfg.reg.probe_prompts, cfg.text_encoder.clip_skip) if main else None

    # ---- loop
    step, losses = 0, []
    progress = progress_bar(cfg.train.max_steps, disable=not main)
    batches = data.batches()
    t0 = time.perf_counter()
    while step < cfg.train.max_steps:
        batch = next(batches)
        with accelerator.accumulate(*trained):
            with torch.no_grad():
                mean, std = data.latent_distribution(batch, comps.vae)
                latents = (mean + std * torch.randn(mean.shape, generator=noise_gen, device=mean.device,
                                                    dtype=mean.dtype)) * comps.vae.config.scaling_factor
            noise = sample_noise(latents, cfg.loss.noise_offset, noise_gen)
            timesteps = torch.randint(cfg.loss.min_timestep, t_max, (latents.shape[0],), generator=noise_gen,
                                      device=latents.device)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            input_ids = tokenize(comps.tokenizer, batch["captions"]).to(accelerator.device)
            with torch.set_grad_enabled(cfg.text_encoder.train):
                embeddings = encode(text_encoder, input_ids, cfg.text_encoder.clip_skip)
            with accelerator.autocast():
                pred = unet(noisy, timesteps, embeddings).sample
            target = diffusion_target(scheduler, latents, noise, timesteps)
            diff_loss = diffusion_loss(pred, target, timesteps, scheduler, cfg.loss, batch["loss_weight"])
            loss = diff_loss
            if regulariser is not None:
                reg = regulariser(input_ids, embeddings)
                loss = diff_loss + cfg.reg.embedding_norm.weight * reg.penalty
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.optim.max_grad_norm is not None:
                accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            continue
        lr_scheduler.step()
        step += 1
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            scalars = {"loss": loss.detach(), "diffusion_loss": diff_loss.detach()}
            if regulariser is not None:
                scalars.update({"embedding_norm/penalty": reg.penalty.detach(), "embedding_norm/mean_norm": reg.mean_norm,
                                "embedding_norm/mean_base_norm": reg.mean_base_norm,
                                "embedding_norm/relative_drift": reg.relative_drift})
            metrics = dict(zip(scalars, accelerator.gather(torch.stack(list(scalars.values()))[None]).mean(0).tolist()))
            loss_value = metrics["loss"]  # the .tolist() above is the only host sync, and only at logging steps
            losses.append(loss_value)
            metrics.update({f"lr/{g['name']}": g["lr"] for g in optimizer.param_groups})
            if regulariser is not None:
                metrics["embedding_norm/cache_hits"] = regulariser.cache.hits
            accelerator.log(metrics, step=step)
            if main:
                append_metrics(out, step, metrics)
            progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}", refresh=False)
        if probe is not None and (step == cfg.train.max_steps or (cfg.reg.probe_every and step % cfg.reg.probe_every == 0)):
            run_probe(probe, accelerator, out, step)
        progress.update(1)
    progress.close()
    accelerator.wait_for_everyone()

    # ---- export
    adapter_path = out / "adapter.safetensors"
    if main:
        export_adapter(layers, adapter_path, cfg, steps=step, base_model=comps.source,
                       base_model_version=comps.base_model_version, report=say)
        finish_run(out, step, time.perf_counter() - t0)
        say(f"sdlora: trained {step} steps in {time.perf_counter() - t0:.1f}s; adapter: {adapter_path}")
    accelerator.end_training()
    return TrainResult(out, adapter_path, comps, layers, losses, step)


# ------------------------------------------------------------------------------------------- helpers
def claim_output_dir(out: Path, *, overwrite: bool) -> None:
    """Refuse to write into a folder that holds a finished or running run unless told to."""
    marker = out / "run.json"
    if marker.is_file() and not overwrite:
        status = json.loads(marker.read_text() or "{}").get("status", "unknown")
        raise UserError(f"output.dir {out} already holds a {status} run; pass --overwrite to replace it"
                        " (or --resume to continue it)")
    atomic.write_json(marker, {"status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S")})


def finish_run(out: Path, step: int, seconds: float) -> None:
    atomic.write_json(out / "run.json", {"status": "finished", "steps": step, "seconds": round(seconds, 2),
                                         "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})


def place_models(comps: Components, layers: dict[str, LoRALayer], device, weight_dtype, cfg) -> None:
    """Frozen weights in the training dtype; LoRA factors and alphas stay fp32."""
    comps.vae.requires_grad_(False)
    for model in (comps.unet, comps.text_encoder, comps.vae):
        model.to(device=device, dtype=weight_dtype)
    for layer in layers.values():
        for name in ("lora_A", "lora_B", "alpha"):
            t = getattr(layer, name)
            t.data = t.data.float()
    comps.vae.eval()
    comps.text_encoder.train(cfg.text_encoder.train)
    comps.unet.train()
    if not cfg.text_encoder.train:
        comps.text_encoder.eval()


def make_data(cfg: Config, comps: Components, accelerator, say):
    from .data import build_training_data

    return build_training_data(cfg, comps, num_processes=accelerator.num_processes,
                               process_index=accelerator.process_index, say=say)


def make_regulariser(cfg: Config, text_encoder, tokenizer, say):
    from .embedding_norm import EmbeddingNormRegulariser

    if cfg.reg.embedding_norm.weight == 0:
        return None  # no extra text-encoder pass at all
    if not cfg.text_encoder.train:
        say("sdlora: reg.embedding_norm.weight is ignored: the text encoder is not trained, its embeddings cannot drift")
        return None
    return EmbeddingNormRegulariser(text_encoder, tokenizer, cfg)


def run_probe(probe: DriftProbe, accelerator, out: Path, step: int) -> dict:
    stats = probe.measure()
    accelerator.log(stats, step=step)
    with open(out / "probe.jsonl", "a", encoding="utf-8") as f:  # append-only, like metrics.jsonl
        f.write(json.dumps({"step": step, **stats}) + "\n")
    return stats


def progress_bar(total: int, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="train", unit="step", disable=disable, dynamic_ncols=True)


def append_metrics(out: Path, step: int, metrics: dict) -> None:
    """metrics.jsonl is append-only (an append never loses earlier lines); everything else is atomic."""
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": step, **{k: (v if math.isfinite(v) else None) for k, v in metrics.items()}}) + "\n")


def tracker_hparams(cfg: Config) -> dict:
    return {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "lr": cfg.optim.lr, "text_encoder_lr": cfg.text_encoder_lr,
            "batch_size": cfg.train.batch_size, "max_steps": cfg.train.max_steps, "init": cfg.lora.init,
            "learnable_alpha": cfg.lora.learnable_alpha, "resolution": cfg.data.resolution}
