"""Sample images during training, from the LIVE model: the UNet and text encoder being trained, adapters on.

The images land in `<output.dir>/samples/step_NNNNNN/` (one PNG per prompt, carrying its settings as A1111's
`parameters` text (png_info.py), plus `grid.png`) and in TensorBoard; the prompts and their settings are
sample_prompts.py's. Prompts are encoded by the family (`family.encode`), exactly as the loop conditions the UNet
(clip_skip included), and handed to the family's `pipeline_class` as embeddings (SDXL: both encoders' hidden
states and the pooled embedding; the pipeline adds the micro-conditioning of an uncropped image at the sample
size, as at inference). Sampling runs in eval mode, with the global RNGs forked so the training run continues
exactly as it would have without samples.
"""

from __future__ import annotations

import inspect
import io
import math
from pathlib import Path

import torch

from sdlora.model.schedule import for_sampling, guidance_rescale, zero_terminal_snr_of
from sdlora.model.text import tokenize
from sdlora.training.png_info import parameters_text, png_info
from sdlora.training.sample_prompts import sample_prompts
from sdlora.util import atomic


def sample_due(step: int, max_steps: int, sample_cfg) -> bool:
    """Every `sample.every_steps` steps, and at the last step (when sampling is on)."""
    every = sample_cfg.every_steps
    return bool(every and sample_cfg.has_prompts()) and (step % every == 0 or step == max_steps)


def inference_scheduler(noise_scheduler):
    """DDIM (eta 0: deterministic) built from the model's own scheduler config (beta schedule, prediction type);
    with zero terminal SNR, on the rescaled schedule from the last timestep (`model.schedule.for_sampling`)."""
    from diffusers import DDIMScheduler

    if "prediction_type" not in noise_scheduler.config:  # rectified flow (SD3): its own Euler sampler, as the pipeline
        return type(noise_scheduler).from_config(noise_scheduler.config)
    return for_sampling(DDIMScheduler.from_config(noise_scheduler.config), zero_terminal_snr_of(noise_scheduler))


@torch.no_grad()
def generate(cfg, comps, unet, text_encoders, device, autocast=None, prompts=None) -> list:
    """One PIL image per sample (`sample_prompts.sample_prompts(cfg)` unless `prompts` is given), from the given
    (live) models; `text_encoders` is the family's list of them (or SD 1.x/2.x's one). Each sample is drawn on its
    own with a CPU generator seeded by its seed, so its PNG's Seed reproduces it alone."""
    s, family = cfg.sample, comps.family
    encoders = list(text_encoders) if isinstance(text_encoders, (list, tuple)) else [text_encoders]
    pipe = family.pipeline(denoiser=unet, vae=comps.vae, text_encoders=dict(zip(family.text_encoders, encoders)),
                           tokenizers=comps.tokenizers, scheduler=inference_scheduler(comps.noise_scheduler))
    pipe.set_progress_bar_config(disable=True)
    prompts = sample_prompts(cfg) if prompts is None else prompts

    def conditioning(texts):
        ids = [tokenize(t, texts, cfg.data.max_token_length).to(device) for t in comps.tokenizers]
        return family.encode(encoders, ids, cfg.text_encoder.clip_skip)

    dtype = next(unet.parameters()).dtype
    embeds = [family.pipeline_embeddings(conditioning([p.prompt]), conditioning([p.negative_prompt]), dtype,
                                         empty_negative=not p.negative_prompt) for p in prompts]
    options = {"guidance_rescale": guidance_rescale(s, comps.zero_terminal_snr)}
    if "guidance_rescale" not in inspect.signature(pipe.__call__).parameters:  # SD3's pipeline has none (no DDPM)
        options = {}
    if s.skip_layer_guidance is not None:  # SD3 only (family.check_config refuses it elsewhere)
        g = s.skip_layer_guidance
        options.update(skip_guidance_layers=list(g.layers), skip_layer_guidance_scale=g.scale,
                       skip_layer_guidance_start=g.start, skip_layer_guidance_stop=g.stop)
    images = []
    with autocast if autocast is not None else torch.autocast("cpu", enabled=False):  # entered once: a one-shot manager
        for p, embed in zip(prompts, embeds):
            generator = torch.Generator().manual_seed(p.seed)  # CPU generator: the same images on every device
            images += pipe(**embed, num_inference_steps=p.steps, guidance_scale=p.guidance_scale, **options,
                           height=p.height, width=p.width, generator=generator, output_type="pil").images
    return images


def make_grid(images: list, cols: int | None = None):
    from PIL import Image

    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = max(i.size[0] for i in images), max(i.size[1] for i in images)  # per-prompt sizes: the largest cell
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid


def _png_bytes(image, parameters: str | None = None) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=png_info(parameters) if parameters else None)
    return buf.getvalue()


def save_samples(images: list, folder: Path, parameters: list[str] | None = None) -> list[Path]:
    """`NN.png` per prompt (with its A1111 `parameters` text, when given) plus `grid.png`, each written atomically."""
    paths = []
    for i, img in enumerate(images):
        paths.append(folder / f"{i:02d}.png")
        atomic.write_bytes(paths[-1], _png_bytes(img, parameters[i] if parameters else None))
    atomic.write_bytes(folder / "grid.png", _png_bytes(make_grid(images)))
    return paths


def sample_during_training(cfg, comps, accelerator, unet, text_encoders, out: Path, step: int) -> Path:
    """Rank 0 only: generate with the live models in eval mode, save, log to TensorBoard, restore train mode."""
    import numpy as np

    encoders = list(text_encoders) if isinstance(text_encoders, (list, tuple)) else [text_encoders]
    models = [accelerator.unwrap_model(m) for m in [unet] + encoders]
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    prompts = sample_prompts(cfg)
    try:
        with torch.random.fork_rng(devices=devices):
            images = generate(cfg, comps, models[0], models[1:], accelerator.device, accelerator.autocast(), prompts)
    finally:
        for m, mode in zip(models, was_training):
            m.train(mode)
    folder = out / "samples" / f"step_{step:06d}"
    rescale = guidance_rescale(cfg.sample, comps.zero_terminal_snr)
    save_samples(images, folder, [parameters_text(p, model=cfg.model.path, lora_name=cfg.output.name,
                                                  clip_skip=cfg.text_encoder.clip_skip, guidance_rescale=rescale)
                                  for p in prompts])
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            same_size = len({i.size for i in images}) == 1  # per-prompt sizes: the grid as one image
            batch = np.stack([np.asarray(i) for i in images]) if same_size else np.asarray(make_grid(images))[None]
            tracker.log_images({"samples": batch}, step=step, dataformats="NHWC")
    return folder
