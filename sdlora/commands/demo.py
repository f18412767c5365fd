"""`sdlora demo`: teach the mini model (sdlora/resources/mini, docs/mini.md) a new word, and show it learned.

The mini model draws coloured handwritten digits from captions (`a red seven on a navy background`). The demo
trains a LoRA (UNet and text encoder) on 24 renders of a star glyph captioned `a red sks on a navy background`, with
output preservation on the captions without `sks` (so the digits stay digits: docs/quality.md shows what happens
without) and a high text-encoder rate (so the new word carries the concept), then samples base and adapted model on
the trigger prompts and on unrelated digit prompts and lets the judge (sdlora/mini/judge.py, not the model) say
what they show. Under two minutes on 2 CPU cores.

`make_shapes_dataset` (coloured circles and squares) stays for the tests that need a quick captioned folder.
"""

from __future__ import annotations

import importlib
import io
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sdlora.util import atomic
from sdlora.errors import UserError
from sdlora.util.ownership import require_own_or_empty_folder

COLOURS = {"red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 180, 60), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")
DEMO_RESOLUTION = 64
MINI_RESOLUTION = 32
# (module, the package that provides it): what the demo imports after training
DEMO_DEPENDENCIES = (("peft", "peft"), ("matplotlib", "matplotlib"), ("sklearn", "scikit-learn"))


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


def check_demo_dependencies() -> None:
    """Before anything trains: the packages of the `demo` extra, named with the command that installs them."""
    missing = []
    for module, package in DEMO_DEPENDENCIES:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise UserError(f"sdlora demo needs {', '.join(missing)} (not installed): pip install 'sdlora[demo]' "
                        f"(from a checkout: pip install -e '.[demo]'), or pip install {' '.join(missing)}")


def make_concept_dataset(folder: Path, n: int = 24, n_digits: int = 0, seed: int = 0, concept: int | None = None) -> Path:
    """n renders of the star glyph (or `concept`: mini.data.CONCEPT_2, the heart) in every colour pair, captioned
    with its trigger word (`sks`, `zwx`), and n_digits renders of digits with their own captions (prior preservation:
    other captions keep drawing what they drew)."""
    from sdlora.mini.data import CONCEPT, digit_renders, glyph_renders

    folder.mkdir(parents=True, exist_ok=True)
    images, _, _, _, captions = glyph_renders(n, seed, concept=CONCEPT if concept is None else concept)
    if n_digits:
        d_images, _, _, _, d_captions = digit_renders(n_digits, seed + 1)
        images, captions = np.concatenate([images, d_images]), captions + d_captions
    for i, (img, cap) in enumerate(zip(images, captions)):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        atomic.write_bytes(folder / f"{i:03d}.png", buf.getvalue())
        atomic.write_text(folder / f"{i:03d}.txt", cap)
    return folder


# What the demo (and tests/test_learning.py) change in the plain LoRA budget of `demo_config`, from the quality table
# (docs/quality.md) and the search in docs/mini.md: trained on the star alone, the LoRA learns it but turns most
# unrelated digit prompts into stars. Output preservation on the captions without the trigger word (weight 2) keeps
# the template `a <colour> ... on a <colour> background` drawing what the base drew, and a text-encoder rate of 1e-2
# (10x the table's) lets the new word carry the concept, so the UNet learns the star for `sks` alone: learned in 150
# steps with the digits kept (the earlier recipe, with prior images, needed 450).
DEMO_STEPS = 150
DEMO_TEXT_ENCODER_LR = 1e-2
DEMO_PRESERVATION = {"weight": 2.0, "source": "captions", "trigger_words": ["sks"]}


def make_demo_data(folder: Path) -> Path:
    """The demo's training folder: 24 star renders (every colour pair) captioned with the trigger word."""
    return make_concept_dataset(folder)


def demo_recipe(root: Path, steps: int, model_path: Path | None = None, seed: int = 0) -> dict:
    """The demo's config: `demo_config` with output preservation and the text encoder's rate (the data:
    `make_demo_data`)."""
    cfg = demo_config(root, steps, model_path, seed)
    cfg["optim"]["text_encoder_lr"] = DEMO_TEXT_ENCODER_LR
    cfg["reg"] = {"preservation": dict(DEMO_PRESERVATION)}
    return cfg


def demo_config(root: Path, steps: int, model_path: Path | None = None, seed: int = 0) -> dict:
    """The plain LoRA budget the demo and the quality table share (docs/quality.md row a)."""
    from sdlora.mini import MINI_MODEL_DIR

    return {
        "model": {"path": str(model_path or MINI_MODEL_DIR)},
        "data": {"path": str(root / "data"), "resolution": MINI_RESOLUTION, "bucketing": False, "bucket_step": 32,
                 "min_image_side": MINI_RESOLUTION},
        "output": {"dir": str(root / "run"), "name": "sdlora-demo"},
        "train": {"max_steps": steps, "batch_size": 8, "seed": seed},
        "optim": {"lr": 3e-3, "text_encoder_lr": 1e-3, "scheduler": "cosine", "warmup_steps": 20},
        "lora": {"rank": 8, "alpha": 8, "conv": True},
        "text_encoder": {"train": True},
        "log": {"tracker": "none"},
    }


def is_demo_folder(folder: Path) -> bool:
    """A folder an earlier `sdlora demo` wrote: its demo.yaml is the demo's recipe for this folder."""
    import yaml

    try:
        cfg = yaml.safe_load((folder / "demo.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(cfg, dict) and cfg.get("output") == demo_recipe(folder, 1)["output"]


def run_demo(out: str | Path, steps: int = DEMO_STEPS) -> dict:
    import yaml

    from sdlora.util.allocator import keep_freed_cpu_memory
    from sdlora.config import validate
    from sdlora.mini import MINI_MODEL_DIR
    from sdlora.mini.judge import Judge, accuracy_on_real_renders
    from sdlora.training.loop import train

    root = Path(out).expanduser().resolve()
    require_own_or_empty_folder(root, "demo --out", is_demo_folder)  # never writes into a folder of someone else's
    check_demo_dependencies()
    keep_freed_cpu_memory()
    t0 = time.perf_counter()
    print("[1/4] the judge: a classifier of digits and the star, fitted on real digit scans (sdlora/mini/judge.py)")
    judge = Judge.fit()
    own = accuracy_on_real_renders(judge, n_digits=1000, n_glyphs=100)
    print(f"      its accuracy on renders of scans it never saw: digits {own['digit']:.1%}, star {own['concept']:.1%}, "
          f"colours {own['colour']:.1%}")
    print(f"[2/4] the new concept: 24 renders of a star captioned 'a <colour> sks on a <colour> background' "
          f"-> {root / 'data'}")
    cfg_dict = demo_recipe(root, steps)
    atomic.write_text(root / "demo.yaml", yaml.safe_dump(cfg_dict, sort_keys=False))  # first: marks the folder the demo's
    make_demo_data(root / "data")
    print(f"[3/4] training a LoRA on sdlora-mini ({MINI_MODEL_DIR.name}), {steps} steps on CPU (config: {root / 'demo.yaml'})")
    result = train(validate(cfg_dict), overwrite=True)
    print("[4/4] sampling base and adapted model (DDIM, CFG 4, fixed seeds) and judging what they draw")
    scores, grid = evaluate_adapter(MINI_MODEL_DIR, result.adapter_path, judge)
    samples = root / "samples.png"
    save_samples(grid, samples)
    curve = root / "loss.png"
    plot_loss(result.out_dir / "metrics.jsonl", curve)
    atomic.write_text(root / "scores.json", json.dumps(scores, indent=1))
    outputs = {"adapter": str(result.adapter_path), "samples": str(samples), "loss_curve": str(curve),
               "run": str(result.out_dir), "seconds": round(time.perf_counter() - t0, 1), "scores": scores}
    print(describe_scores(scores))
    print("\nsdlora demo finished in {seconds}s\n  adapter:    {adapter}\n  samples:    {samples} (top row: base, bottom "
          "row: adapted)\n  loss curve: {loss_curve}\n  run folder: {run}".format(**outputs))
    return outputs


def describe_scores(s: dict) -> str:
    b, a = s["base"], s["adapted"]
    return (f"\njudge: concept learned ('sks' drawn as the star): {a['concept']:.0%} of {a['n_concept']} trigger samples "
            f"(base model: {b['concept']:.0%})\n"
            f"       unrelated prompts still right: digit {a['digit']:.0%}, colours {a['colour']:.0%} "
            f"(base model: digit {b['digit']:.0%}, colours {b['colour']:.0%}; {a['n_unrelated']} samples)\n"
            f"       unrelated prompts drawn as the star: {a['unrelated_star']:.0%} (base model: {b['unrelated_star']:.0%})")


def evaluation_cases(seeds_per_concept_case: int = 1, unrelated_per_digit: int = 6):
    """Trigger prompts (every colour pair) and unrelated digit prompts (training combinations, colours rotated)."""
    from sdlora.mini.data import BACKGROUNDS, HELD_OUT, STROKES, caption
    from sdlora.mini.skill import concept_cases

    concept = concept_cases(seeds_per_concept_case, first_seed=500)
    strokes, bgs = list(STROKES), list(BACKGROUNDS)
    prompts, seeds, truth = [], [], []
    k = 0
    for label in range(10):
        for j in range(unrelated_per_digit):
            stroke = strokes[(label + j) % len(strokes)]
            if (stroke, label) in HELD_OUT:
                stroke = strokes[(label + j + 1) % len(strokes)]
            bg = bgs[(label + 2 * j) % len(bgs)]
            prompts.append(caption(stroke, label, bg))
            seeds.append(700 + k)
            truth.append((label, stroke, bg))
            k += 1
    return concept, (prompts, seeds, truth)


def evaluate_adapter(model_dir, adapter, judge, *, seeds_per_concept_case: int = 1, unrelated_per_digit: int = 6,
                     scale: float = 1.0):
    """Judge's scores of base and adapted model, and the images for the samples picture."""
    from sdlora.mini.data import CONCEPT
    from sdlora.mini.skill import load_pipeline, sample, score

    (cp, cs, ct), (up, us, ut) = evaluation_cases(seeds_per_concept_case, unrelated_per_digit)
    pipe = load_pipeline(model_dir)
    scores, images = {}, {}
    for which in ("base", "adapted"):
        if which == "adapted":
            pipe.load_lora_weights(str(adapter))
            pipe.fuse_lora(lora_scale=scale)
        imgs = sample(pipe, cp + up, cs + us)
        c, u = score(judge, imgs[:len(cp)], ct), score(judge, imgs[len(cp):], ut)
        scores[which] = {"concept": c["shape"], "n_concept": c["n"], "concept_colour": c["colour"],
                         "digit": u["shape"], "colour": u["colour"], "n_unrelated": u["n"],
                         "unrelated_star": float(np.mean([lab == CONCEPT for lab in u["labels"]]))}
        images[which] = imgs
    show = [0, 4, 8, 13]  # four trigger prompts, then four unrelated ones
    show_u = [len(up) * k // 4 for k in range(4)]
    grid = {"prompts": [cp[i] for i in show] + [up[i] for i in show_u],
            "base": [images["base"][i] for i in show] + [images["base"][len(cp) + i] for i in show_u],
            "adapted": [images["adapted"][i] for i in show] + [images["adapted"][len(cp) + i] for i in show_u]}
    return scores, grid


def save_samples(grid: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(grid["prompts"])
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 4.0), dpi=100)
    for j in range(n):
        for i, which in enumerate(("base", "adapted")):
            ax = axes[i, j]
            ax.imshow(grid[which][j], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(which, fontsize=10)
        words = grid["prompts"][j].replace(" background", "").split(" ", 3)
        axes[0, j].set_title(" ".join(words[:3]) + "\n" + words[3], fontsize=8)
    fig.suptitle("sdlora demo: trigger word 'sks' (left four) and unrelated prompts (right four)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
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
