"""Estimating an adapter's row-wise Fisher (`sdlora.adapter.fisher`) with the base model and the adapter.

F[j] = (1/N) Σ_n Σ_k (∂L_n/∂W[j, k])² for each adapted module's weight W = W0 + ΔW, where L_n is the diffusion loss
of one example (one image's latent, its caption, one random timestep and noise draw): the empirical Fisher of
single-example gradients, summed over each output row's inputs (FWSVD's row Fisher, Hsu et al. 2022). The adapter
is merged into the weights first (`algebra.merge_adapter`, through each kind's `delta_weight`), so the gradient is
the same for every adapter kind and needs nothing from the training layers. Cost: N forward and backward passes.

Examples come from an image folder (the run's own data at the end of `sdlora train`, or `--fisher-data FOLDER`)
or from a prompts file (`--fisher-data PROMPTS.txt`), whose latents the adapted model samples itself (then the
estimate is the model's own Fisher, not the empirical one). Any family: SDXL's examples carry its size and crop
conditioning (the folder's images as `data.pipeline.size_conditioning` gives it, a prompt's as its pipeline samples).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from sdlora.adapter.algebra import component_module, merge_adapter
from sdlora.adapter.fisher import RowFisher
from sdlora.adapter.names import split_name
from sdlora.errors import UserError
from sdlora.model.text import tokenize
from sdlora.training.losses import diffusion_loss, diffusion_target

PROMPT_SAMPLING_STEPS = 20  # DDIM steps per latent sampled for a prompts file


class Example(NamedTuple):
    """One example of the estimate: the scaled latent (C, h, w), its caption, and SDXL's micro-conditioning
    ((h, w) original size, (top, left) crop, (h, w) target size, in pixels; other families ignore it)."""

    latent: torch.Tensor
    caption: str
    sizes: tuple = ((0, 0), (0, 0), (0, 0))

    def batch(self) -> dict:
        """The example as a one-image training batch's conditioning fields (`family.unet_kwargs` reads them)."""
        from sdlora.data.pipeline import conditioning_fields

        return conditioning_fields([self.caption], [self.sizes])


def folder_examples(comps, subsets, data_cfg) -> list[Example]:
    """Every usable image of `subsets` as its scaled latent mean, centre-cropped to its bucket, unflipped, its caption
    as written (prefix and suffix, no dropout): what the validation loss sees."""
    from sdlora.data.buckets import bucket_sizes
    from sdlora.data.captions import base_caption
    from sdlora.data.pipeline import scan, size_conditioning
    from sdlora.data.samples import center_offset, load_pixels
    from sdlora.data.sources import discover

    samples, _ = scan(discover(subsets, 1.0), data_cfg, bucket_sizes(data_cfg))
    if not samples:
        raise UserError(f"Fisher data: no usable images in {', '.join(s.path for s in subsets)}")
    vae = comps.vae
    p = next(vae.parameters())
    out = []
    for sample in samples:
        offset = center_offset(sample)
        pixels = load_pixels(sample, offset, False, data_cfg)[None]
        with torch.no_grad():
            mean = vae.encode(pixels.to(p.device, p.dtype)).latent_dist.mean.float()
        out.append(Example((mean * vae.config.scaling_factor)[0], base_caption(sample.item.caption, subsets[sample.item.subset]),
                           size_conditioning(sample, offset, False)))
    return out


@torch.no_grad()
def prompt_examples(comps, prompts: list[str], resolution: int, seed: int) -> list[Example]:
    """The latent the adapted model samples for each prompt through the family's pipeline: PROMPT_SAMPLING_STEPS DDIM
    steps, guidance 7.5, at resolution² (SDXL: original = target size, no crop, as the pipeline conditions it). Call
    after the adapter is merged into `comps`."""
    from sdlora.training.sampling import inference_scheduler

    pipe = comps.family.pipeline(denoiser=comps.denoiser, vae=comps.vae, text_encoders=comps.text_encoders,
                                 tokenizers=comps.tokenizers, scheduler=inference_scheduler(comps.noise_scheduler))
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for prompt in prompts:
        latents = pipe(prompt, height=resolution, width=resolution, num_inference_steps=PROMPT_SAMPLING_STEPS,
                       generator=gen, output_type="latent").images
        out.append(Example(latents[0].float(), prompt, ((resolution, resolution), (0, 0), (resolution, resolution))))
    return out


def read_prompts(path: Path) -> list[str]:
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"--fisher-data {path}: no prompts (one per line)")
    return prompts


def estimate_row_fisher(comps, adapter, examples: list[Example], *, samples: int, seed: int = 0,
                        loss_cfg=None, clip_skip: int = 1, max_token_length: int | None = None,
                        min_timestep: int = 0, max_timestep: int | None = None, data: str = "") -> RowFisher:
    """The row Fisher of every module of `adapter` over `samples` single-example gradients (examples taken in turn,
    each with a timestep drawn uniformly in [min_timestep, max_timestep) and fresh noise, from a generator seeded
    with `seed`). `comps` must hold the adapter merged into its weights (`algebra.merge_adapter`; `fisher_from_data`
    does it); any family (SDXL: both encoders, its pooled embedding and each example's micro-conditioning).
    `loss_cfg` is the run's loss section (default: plain MSE). Returns (out,) float32 per module."""
    from sdlora.config import LossConfig

    if samples < 1 or not examples:
        raise UserError(f"the Fisher estimate needs at least one example and one sample (got {len(examples)}, {samples})")
    loss_cfg = loss_cfg or LossConfig()
    models = comps.adaptable()
    for m in models.values():
        m.requires_grad_(False)
    weights = {n: component_module(models, n).weight for n in adapter.modules}
    for w in weights.values():
        w.requires_grad_(True)
    train_te = any(split_name(n)[0] in comps.family.text_encoders for n in weights)
    encoders, tokenizers = list(comps.text_encoders.values()), comps.tokenizers
    scheduler, family = comps.noise_scheduler, comps.family
    t_max = max_timestep or scheduler.config.num_train_timesteps
    device = next(comps.unet.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    sums = {n: torch.zeros(w.shape[0], dtype=torch.float64) for n, w in weights.items()}
    names, params = list(weights), list(weights.values())
    for n in range(samples):
        example = examples[n % len(examples)]
        latents = example.latent[None].to(device)
        noise = torch.randn(latents.shape, generator=gen).to(device)
        t = torch.randint(min_timestep, t_max, (1,), generator=gen).to(device)
        noisy = scheduler.add_noise(latents, noise, t)
        ids = [tokenize(tok, [example.caption], max_token_length).to(device) for tok in tokenizers]
        with torch.set_grad_enabled(train_te):
            embeddings = family.encode(encoders, ids, clip_skip)
        pred = comps.unet(noisy, t, **family.unet_kwargs(embeddings, example.batch())).sample
        loss = diffusion_loss(pred, diffusion_target(scheduler, latents, noise, t), t, scheduler, loss_cfg)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for name, g in zip(names, grads):
            if g is not None:
                sums[name] += g.detach().double().pow(2).flatten(1).sum(1).cpu()
    for w in params:
        w.requires_grad_(False)
    return RowFisher({n: (s / samples).float() for n, s in sums.items()}, samples=samples, data=data)


def fisher_from_data(adapter, base: str, source: str, *, samples: int, seed: int = 0, resolution: int | None = None,
                     config_dir: str | None = None, loss_cfg=None, clip_skip: int = 1) -> RowFisher:
    """Load the base model `base` fresh, merge `adapter` into it and estimate its row Fisher on `source`: a folder of
    images with captions, or a text file of prompts (one per line; latents sampled by the adapted model).
    `resolution`: the images' bucket area budget (default: the adapter's run record's, else the family's native)."""
    from sdlora.adapter.run_record import RunRecord
    from sdlora.config import DataConfig, SubsetConfig
    from sdlora.model.loading import load_components

    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"--fisher-data: no such folder or prompts file: {source}")
    comps = load_components(str(base), config_dir=config_dir)
    for part in (*comps.adaptable().values(), comps.vae):  # fp32 whatever the files hold (sdlora-mini: fp16)
        part.to(torch.float32)
    record = RunRecord.from_metadata(adapter.metadata)
    res = resolution or (record.resolution if record else comps.family.resolution)
    if path.is_dir():
        data_cfg = DataConfig(path=str(path), resolution=res)
        examples = folder_examples(comps, [SubsetConfig(path=str(path))], data_cfg)
    merge_adapter(adapter, comps.adaptable(), where=f"--base {base}")
    if not path.is_dir():
        examples = prompt_examples(comps, read_prompts(path), res, seed)
    return estimate_row_fisher(comps, adapter, examples, samples=samples, seed=seed, loss_cfg=loss_cfg,
                               clip_skip=clip_skip, data=path.name)


def store_run_fisher(cfg, adapter_path: Path, device, say=print) -> RowFisher:
    """`export.fisher_samples`: the row Fisher of the run's final adapter on the run's own data (every image of
    `data`, centre-cropped, captions as written), with the run's loss, clip skip and timestep range, on a fresh copy
    of the base model; written into the adapter file's metadata (atomically)."""
    import time

    from sdlora.adapter.fisher import with_fisher
    from sdlora.adapter.io import load_adapter
    from sdlora.adapter.weights import save_native
    from sdlora.model.loading import load_components

    t0 = time.perf_counter()
    adapter = load_adapter(adapter_path)
    m = cfg.model
    comps = load_components(m.path, vae_path=m.vae_path, config_dir=m.config_dir, allow_pickle=m.allow_pickle,
                            prediction_type=m.prediction_type, zero_terminal_snr=m.zero_terminal_snr)
    for part in (*comps.adaptable().values(), comps.vae):  # fp32 whatever the files hold (sdlora-mini: fp16)
        part.to(device, torch.float32)
    examples = folder_examples(comps, cfg.data_subsets(), cfg.data)
    merge_adapter(adapter, comps.adaptable())
    fisher = estimate_row_fisher(comps, adapter, examples, samples=cfg.export.fisher_samples, seed=cfg.train.seed,
                                 loss_cfg=cfg.loss, clip_skip=cfg.text_encoder.clip_skip,
                                 max_token_length=cfg.data.max_token_length, min_timestep=cfg.loss.min_timestep,
                                 max_timestep=cfg.loss.max_timestep, data="the run's data")
    adapter.metadata = with_fisher(adapter.metadata, fisher)
    save_native(adapter, adapter_path)
    say(f"sdlora: row Fisher of {len(fisher.modules)} modules over {fisher.samples} samples stored in {adapter_path} "
        f"({time.perf_counter() - t0:.1f}s)")
    return fisher
