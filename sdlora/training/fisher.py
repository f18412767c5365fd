"""Estimating an adapter's row-wise Fisher (`sdlora.adapter.fisher`) with the base model and the adapter.

F[j] = (1/N) Σ_n Σ_k (∂L_n/∂W[j, k])² for each adapted module's weight W = W0 + ΔW, where L_n is the diffusion loss
of one example (one image's latent, its caption, one random timestep and noise draw): the empirical Fisher of
single-example gradients, summed over each output row's inputs (FWSVD's row Fisher, Hsu et al. 2022). The adapter
is merged into the weights first (`algebra.merge_adapter`, through each kind's `delta_weight`), so the gradient is
the same for every adapter kind and needs nothing from the training layers. Cost: N forward and backward passes.

Examples come from an image folder (`--fisher-data FOLDER`), the run's own images at the end of `sdlora train` (the
training models in memory, the adapter merged into copies of its modules' weights), or from a prompts file (`--fisher-data PROMPTS.txt`), whose latents the adapted model samples itself (then the
estimate is the model's own Fisher, not the empirical one). Any family: SDXL's examples carry its size and crop
conditioning (the folder's images as `data.pipeline.size_conditioning` gives it, a prompt's as its pipeline samples).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import NamedTuple

import torch

from sdlora.adapter.algebra import component_module, merge_adapter
from sdlora.adapter.fisher import RowFisher
from sdlora.adapter.names import split_name
from sdlora.errors import UserError
from sdlora.model.low_bits import dense_weight
from sdlora.model.objective import vae_latents
from sdlora.model.text import tokenize
from sdlora.training.draws import GeneratorDraws
from sdlora.training.step import step_loss

PROMPT_SAMPLING_STEPS = 20  # sampler steps per latent sampled for a prompts file (DDIM; SD3: its Euler)


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
    """Every usable image of `subsets` as its latent mean (scaled and shifted as the VAE config says), centre-cropped
    to its bucket, unflipped, its caption as written (prefix and suffix, no dropout): what the validation loss sees."""
    from sdlora.data.pipeline import scan
    from sdlora.data.sources import discover

    samples, _ = scan(discover(subsets, 1.0), data_cfg)
    if not samples:
        raise UserError(f"Fisher data: no usable images in {', '.join(s.path for s in subsets)}")
    return sample_examples(comps.vae, samples, subsets, data_cfg)


def sample_examples(vae, samples: list, subsets, data_cfg) -> list[Example]:
    """`folder_examples` for samples already scanned (`data.pipeline.scan`)."""
    from sdlora.data.captions import base_caption
    from sdlora.data.pipeline import size_conditioning
    from sdlora.data.samples import center_offset, load_pixels

    p = next(vae.parameters())
    out = []
    for sample in samples:
        offset = center_offset(sample)
        pixels = load_pixels(sample, offset, False, data_cfg)[None]
        with torch.no_grad():
            mean = vae.encode(pixels.to(p.device, p.dtype)).latent_dist.mean.float()
        latent = vae_latents(mean, vae.config.scaling_factor, vae.config.get("shift_factor"))[0]
        out.append(Example(latent, base_caption(sample.item.caption, subsets[sample.item.subset]),
                           size_conditioning(sample, offset, False)))
    return out


@torch.no_grad()
def prompt_examples(comps, prompts: list[str], resolution: int, seed: int) -> list[Example]:
    """The latent the adapted model samples for each prompt through the family's pipeline: PROMPT_SAMPLING_STEPS steps
    of `sampling.inference_scheduler` (DDIM; SD3: flow-matching Euler), the pipeline's default guidance (7.5; SD3:
    7.0), at resolution² (SDXL: original = target size, no crop, as the pipeline conditions it). Call
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


def estimate_row_fisher(comps, adapter, examples: list[Example], objective, *, samples: int, seed: int = 0,
                        loss_cfg=None, clip_skip: int = 1, max_token_length: int | None = None, data: str = "",
                        autocast=contextlib.nullcontext) -> RowFisher:
    """The row Fisher of every module of `adapter` over `samples` single-example gradients (examples taken in turn,
    each with noise and a time drawn by `objective` (DDPM: a timestep from loss.timestep_sampling in its range; no
    noise offset, pyramid noise or input perturbation: pass `objective.plain()`) from a generator seeded with `seed`, on the CPU). `comps` must hold the adapter merged into
    its weights (`algebra.merge_adapter`; `fisher_from_data` does it; `merged_into_modules` for training models);
    any family (SDXL: both encoders, its pooled embedding and each example's micro-conditioning). `loss_cfg` is the
    run's loss section (default: plain MSE). Returns (out,) float32 per module."""
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
    encoders, tokenizers, family = list(comps.text_encoders.values()), comps.tokenizers, comps.family
    device = next(comps.denoiser.parameters()).device
    draws = GeneratorDraws(torch.Generator().manual_seed(seed), 1, device)
    sums = {n: torch.zeros(w.shape[0], dtype=torch.float64) for n, w in weights.items()}
    names, params = list(weights), list(weights.values())
    for n in range(samples):
        example = examples[n % len(examples)]
        x0 = example.latent[None].to(device)
        noised = objective.noised(x0, *objective.draw(draws, x0))
        ids = [tokenize(tok, [example.caption], max_token_length).to(device) for tok in tokenizers]
        with torch.set_grad_enabled(train_te):
            embeddings = family.encode(encoders, ids, clip_skip)
        loss = step_loss(objective, family, comps.denoiser, noised, embeddings, example.batch(), loss_cfg, autocast)
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
    from sdlora.config import DataConfig, LossConfig, SubsetConfig
    from sdlora.model.loading import load_components

    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"--fisher-data: no such folder or prompts file: {source}")
    comps = load_components(str(base), config_dir=config_dir)
    for part in (*comps.adaptable().values(), comps.vae):  # fp32 whatever the files hold (sdlora-mini: fp16)
        part.to(torch.float32)
    record = RunRecord.from_metadata(adapter.metadata)
    comps.family = comps.family.for_run(comps, _run_text_settings(record))  # SD3: the run's T5 length, text width
    res = resolution or (record.resolution if record else comps.family.resolution)
    if path.is_dir():
        data_cfg = DataConfig(path=str(path), resolution=res)
        examples = folder_examples(comps, [SubsetConfig(path=str(path))], data_cfg)
    merge_adapter(adapter, comps.adaptable(), where=f"--base {base}")
    if not path.is_dir():
        examples = prompt_examples(comps, read_prompts(path), res, seed)
    objective = comps.family.objective(comps.noise_scheduler, comps.vae.config, loss_cfg or LossConfig()).plain()
    return estimate_row_fisher(comps, adapter, examples, objective, samples=samples, seed=seed, loss_cfg=loss_cfg,
                               clip_skip=clip_skip, data=path.name)


def _run_text_settings(record):
    """What `ModelFamily.for_run` reads of a config (`text_encoder`), from the adapter's run record (SD3: the T5
    length it trained with); the defaults for a file without one, or whose section this version cannot read."""
    from types import SimpleNamespace

    from pydantic import ValidationError

    from sdlora.config import TextEncoderConfig

    section = (record.config.get("text_encoder") if record is not None else None) or {}
    try:
        return SimpleNamespace(text_encoder=TextEncoderConfig.model_validate(section))
    except ValidationError:
        return SimpleNamespace(text_encoder=TextEncoderConfig())


def store_run_fisher(cfg, adapter, adapter_path: Path, comps, layers: dict, data, objective,
                     autocast=contextlib.nullcontext, say=print) -> RowFisher:
    """`export.fisher_samples`: the row Fisher of the run's final `adapter` (as written to `adapter_path`) on the
    run's own images (every usable image of `data`, validation's held-out ones included, centre-cropped, captions as
    written), with the run's loss, clip skip and timestep range, on the training models in memory (`comps` with its
    injected `layers`; the adapter merged into copies of the adapted modules' weights, `merged_into_modules`);
    written into the adapter file's metadata (atomically). In fp32 the numbers are those of a fresh base model with
    the file merged in; under mixed precision the frozen weights are the training dtype's (`autocast`)."""
    import time

    from sdlora.adapter.fisher import with_fisher
    from sdlora.adapter.weights import save_native

    t0 = time.perf_counter()
    examples = sample_examples(comps.vae, data.scanned, cfg.data_subsets(), cfg.data)
    with merged_into_modules(comps, layers, adapter):
        fisher = estimate_row_fisher(comps, adapter, examples, objective.plain(), samples=cfg.export.fisher_samples,
                                     seed=cfg.train.seed, loss_cfg=cfg.loss, clip_skip=cfg.text_encoder.clip_skip,
                                     max_token_length=cfg.data.max_token_length, data="the run's data",
                                     autocast=autocast)
    adapter.metadata = with_fisher(adapter.metadata, fisher)
    save_native(adapter, adapter_path)
    say(f"sdlora: row Fisher of {len(fisher.modules)} modules over {fisher.samples} samples stored in {adapter_path} "
        f"({time.perf_counter() - t0:.1f}s)")
    return fisher


@contextlib.contextmanager
def merged_into_modules(comps, layers: dict, adapter):
    """Inside the block each adapted module of `comps` is a copy of its base module whose weight is W0 + ΔW (fp32,
    merged as `algebra.merge_adapter` merges: in float64 from the record's ΔW), in place of its adapter layer, and
    the models are in eval mode; after it the layers, the modes and every requires_grad flag are as they were.
    W0 is the layer's base weight (plus the init's offset s0·B0·A0, in float64, for the compensated and principal
    inits, whose stored base weight is offset by it)."""
    models = comps.adaptable()
    where = {id(m): (model, path) for model in models.values() for path, m in model.named_modules()}
    flags = {p: p.requires_grad for model in models.values() for p in model.parameters()}
    modes = {m: m.training for model in models.values() for m in model.modules()}
    swapped = []
    try:
        for name, record in adapter.modules.items():
            layer = layers[name]
            model, path = where[id(layer)]
            parent, _, child = path.rpartition(".")
            parent = model.get_submodule(parent) if parent else model
            swapped.append((parent, child, layer))
            setattr(parent, child, merged_copy(layer, record))
        for model in models.values():
            model.eval()
        yield
    finally:
        for parent, child, layer in reversed(swapped):
            setattr(parent, child, layer)
        for m, training in modes.items():
            m.train(training)
        for p, flag in flags.items():
            p.requires_grad_(flag)


@torch.no_grad()
def merged_copy(layer, record) -> torch.nn.Module:
    """A copy of `layer.base` (sharing its bias and buffers) with the weight W0 + ΔW as a new fp32 parameter."""
    import copy

    w0 = dense_weight(layer.base.weight, torch.float32).detach()  # a low-bit base (model/low_bits.py) dequantised
    if getattr(layer, "offset_A", None) is not None:
        w0 = (w0.to(torch.float64) + layer._dense(layer.offset_A.double(), layer.offset_B.double())).to(torch.float32)
    merged = (w0.to(torch.float64) + record.delta_weight(w0).to(torch.float64)).to(torch.float32)
    module = copy.copy(layer.base)
    module._parameters = {**layer.base._parameters, "weight": torch.nn.Parameter(merged, requires_grad=False)}
    return module
