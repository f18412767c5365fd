"""`sdlora demo`: tiny model + synthetic captioned shapes, ~100 CPU steps, export, load in diffusers, sample."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sdlora.util import atomic

COLOURS = {"red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 180, 60), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")
DEMO_RESOLUTION = 64


def make_shapes_dataset(folder: Path, n: int = 16, size: int = DEMO_RESOLUTION, seed: int = 0) -> Path:
    """n images of a coloured shape on a white background, each with a caption naming colour and shape."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = [(c, s) for c in COLOURS for s in SHAPES]
    for i in range(n):
        colour, shape = names[i % len(names)]
        img = Image.new("RGB", (size, size), (255, 255, 255))
        d = ImageDraw.Draw(img)
        r = int(size * rng.uniform(0.22, 0.34))
        cx, cy = (int(size / 2 + rng.integers(-size // 8, size // 8 + 1)) for _ in range(2))
        box = (cx - r, cy - r, cx + r, cy + r)
        (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLOURS[colour])
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        atomic.write_bytes(folder / f"{i:03d}.png", buf.getvalue())
        atomic.write_text(folder / f"{i:03d}.txt", f"a photo of a {colour} {shape}")
    return folder


def demo_config(root: Path, steps: int) -> dict:
    return {
        "model": {"path": str(root / "model")},
        "data": {"path": str(root / "data"), "resolution": DEMO_RESOLUTION},
        "output": {"dir": str(root / "run"), "name": "sdlora-demo"},
        "train": {"max_steps": steps, "batch_size": 4, "seed": 0},
        "optim": {"lr": 1e-3, "text_encoder_lr": 5e-4, "scheduler": "cosine", "warmup_steps": 10},
        "lora": {"rank": 8, "alpha": 8},
        "text_encoder": {"train": True},
    }


def run_demo(out: str | Path, steps: int = 100) -> dict:
    import yaml

    from sdlora.config import validate
    from sdlora.model.tiny import make_tiny_model
    from sdlora.training.loop import train

    root = Path(out).resolve()
    t0 = time.perf_counter()
    print(f"[1/4] tiny model -> {root / 'model'}")
    make_tiny_model(root / "model", seed=0)
    print(f"[2/4] synthetic dataset (16 captioned images) -> {root / 'data'}")
    make_shapes_dataset(root / "data")
    cfg_dict = demo_config(root, steps)
    atomic.write_text(root / "demo.yaml", yaml.safe_dump(cfg_dict, sort_keys=False))
    print(f"[3/4] training {steps} steps on CPU (config: {root / 'demo.yaml'})")
    result = train(validate(cfg_dict), overwrite=True)
    print("[4/4] loading the adapter into a diffusers pipeline and sampling")
    samples = root / "samples.png"
    sample_base_vs_adapted(root / "model", result.adapter_path, samples)
    curve = root / "loss.png"
    plot_loss(result.out_dir / "metrics.jsonl", curve)
    outputs = {"adapter": str(result.adapter_path), "samples": str(samples), "loss_curve": str(curve),
               "run": str(result.out_dir), "seconds": round(time.perf_counter() - t0, 1)}
    print("\nsdlora demo finished in {seconds}s\n  adapter:    {adapter}\n  samples:    {samples} (top: base, bottom: "
          "adapted)\n  loss curve: {loss_curve}\n  run folder: {run}".format(**outputs))
    return outputs


PROMPTS = ["a photo of a red circle", "a photo of a blue square", "a photo of a green circle", "a photo of a yellow square"]


def sample_base_vs_adapted(model_dir: Path, adapter: Path, path: Path) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def row():
        gen = torch.Generator().manual_seed(0)
        return pipe(PROMPTS, num_inference_steps=20, height=DEMO_RESOLUTION, width=DEMO_RESOLUTION,
                    generator=gen, output_type="pil").images

    base = row()
    pipe.load_lora_weights(str(adapter))
    adapted = row()
    s = DEMO_RESOLUTION
    grid = Image.new("RGB", (s * len(PROMPTS), 2 * s), (255, 255, 255))
    for i, (b, a) in enumerate(zip(base, adapted)):
        grid.paste(b, (i * s, 0))
        grid.paste(a, (i * s, s))
    grid = grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST)
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    atomic.write_bytes(path, buf.getvalue())


def plot_loss(metrics_file: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows if r.get("loss") is not None]
    loss = [r["loss"] for r in rows if r.get("loss") is not None]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, loss, lw=0.8, alpha=0.5, label="loss")
    if len(loss) >= 10:
        k = 10
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, lw=2, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("diffusion loss")
    ax.set_title("sdlora demo")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic.write_bytes(path, buf.getvalue())
