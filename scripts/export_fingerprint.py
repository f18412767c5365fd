"""Fingerprint what a fixed run writes, through the public CLI only, so two versions of sdlora can be compared.

For the tiny SD 1.x, SD 2.x-v and SDXL models, two fixed runs each:
- `base`: compensated init, learnable alpha, text encoder, conv, penalty, clip skip 2; then the kohya (fp32 and
  fp16), merged-diffusers and merged-single-file exports;
- `options`: the options around the step: gradient accumulation, min-SNR, noise offset, timestep bounds, Huber
  (SD 2.x-v: zero terminal SNR and a frozen, cached text encoder), EMA (`train.ema`), the validation loss
  (`validation`, one image held out), output preservation (`reg.preservation`) and the end-of-run row Fisher
  (`export.fisher_samples`).
It prints one sha256 per file over its tensors (name, dtype, shape, bytes) and one over its metadata without the
fields that hold a time or a path, one over the stored row Fisher's values, one over each checkpoint torch file (optimizer
moments, generator states) and one over every logged number of metrics.jsonl (losses, validation loss, rates),
probe.jsonl and the checkpoint's trainer_state.json. A redesign that changes no behaviour prints the same lines before
and after it:

    python3 scripts/export_fingerprint.py --work /tmp/fp > old.txt   # on the old commit
    python3 scripts/export_fingerprint.py --work /tmp/fp > new.txt   # on the new one (the same --work: paths
    diff old.txt new.txt                                              # are part of the metadata)

Run it on one thread (OMP_NUM_THREADS=1): CPU runs are bit-identical only then (docs/reliability.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

VOLATILE = ("created", "time", "date", "path", "dir", "source", "sha256", "hash", "version", "seconds", "started",
            "finished", "modelspec.title", "ss_output_name", "ss_training_comment")


def sh(*args: str) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    subprocess.run([sys.executable, "-m", "sdlora.cli", *args], check=True, env=env, stdout=subprocess.DEVNULL)


def make_images(folder: Path, n: int = 6) -> None:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    colours = ["red", "blue", "green", "yellow", "white", "black"]
    for i in range(n):
        img = Image.new("RGB", (64, 64), colours[(i + 3) % 6])
        ImageDraw.Draw(img).ellipse((8 + i, 10, 50, 54 - i), fill=colours[i % 6])
        img.save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"a photo of a {colours[i % 6]} circle", encoding="utf-8")


def scrub(meta: dict) -> dict:
    out = {}
    for k, v in sorted(meta.items()):
        if any(word in k.lower() for word in VOLATILE):
            continue
        try:
            parsed = json.loads(v)
        except (TypeError, ValueError):
            out[k] = v
            continue
        out[k] = json.dumps(scrub(parsed) if isinstance(parsed, dict) else parsed, sort_keys=True)
    return out


def fingerprint_file(path: Path) -> tuple[str, str]:
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        for k in sorted(f.keys()):
            t = f.get_tensor(k).contiguous()
            h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    m = hashlib.sha256(json.dumps(scrub(meta), sort_keys=True).encode()).hexdigest()
    return h.hexdigest()[:16], m[:16]


def fingerprint_fisher(path: Path) -> str:
    """The stored row Fisher's modules and values (metadata `sdlora.fisher`), or 'none'."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("sdlora.fisher")
    if raw is None:
        return "none"
    stored = json.loads(raw)
    return hashlib.sha256(json.dumps(stored, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint_pickle(path: Path) -> str:
    """A checkpoint's torch file (optimizer moments, generator states) read with weights_only: every tensor and
    number, in order."""
    import torch

    h = hashlib.sha256()

    def walk(x, key=""):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(-1).view(dtype=torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                walk(x[k], f"{key}/{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{key}/{i}")
        else:
            h.update(f"{key}={x!r}|".encode())

    walk(torch.load(path, map_location="cpu", weights_only=True))
    return h.hexdigest()[:16]


def fingerprint_json(path: Path) -> str:
    return hashlib.sha256(json.dumps(json.loads(path.read_text(encoding="utf-8")), sort_keys=True).encode()).hexdigest()[:16]


def fingerprint_metrics(path: Path) -> str:
    """Every logged number of a JSONL log (metrics.jsonl, probe.jsonl), records in order (fields that hold a time
    left out)."""
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [{k: v for k, v in r.items() if not any(w in k.lower() for w in VOLATILE)} for r in records]
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def write_config(root: Path, cfg: dict) -> Path:
    import yaml

    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def trained_files(out: Path) -> dict[str, Path]:
    files = {"adapter": out / "adapter.safetensors"}
    if (out / "adapter_ema.safetensors").is_file():
        files["adapter-ema"] = out / "adapter_ema.safetensors"
    ckpt = sorted((out / "checkpoints").glob("step_*"))[-1]
    for f in sorted(ckpt.glob("*.safetensors")):
        files[f"checkpoint/{f.name}"] = f
    for f in sorted(ckpt.glob("*.pt")):
        files[f"checkpoint/{f.name}"] = f
    return files


def lines_for(label: str, files: dict[str, Path], out: Path) -> list[str]:
    lines = []
    for name, path in files.items():
        if path.suffix == ".pt":
            lines.append(f"{label} {name}: {fingerprint_pickle(path)}")
            continue
        tensors, meta = fingerprint_file(path)
        lines.append(f"{label} {name}: tensors {tensors} metadata {meta}")
    ckpt = sorted((out / "checkpoints").glob("step_*"))[-1]
    lines.append(f"{label} checkpoint/trainer_state.json: {fingerprint_json(ckpt / 'trainer_state.json')}")
    lines.append(f"{label} fisher: {fingerprint_fisher(out / 'adapter.safetensors')}")
    for log in ("metrics", "probe"):
        lines.append(f"{label} {log}: {fingerprint_metrics(out / f'{log}.jsonl')}")
    return lines


def run_options(work: Path, variant: str, model: Path, data: Path) -> list[str]:
    """The options around the step, on the same model and data as `run`."""
    root = work / variant / "options"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    out = root / "run"
    v = variant == "sd2-v"
    cfg = {
        "model": {"path": str(model), **({"zero_terminal_snr": True} if v else {})},
        "data": {"path": str(data), "resolution": 64},
        "output": {"dir": str(out), "name": "fp"},
        "train": {"max_steps": 4, "batch_size": 2, "seed": 5, "gradient_accumulation_steps": 2,
                  "ema": {"enabled": True, "decay": 0.8, "start_step": 1}},
        "optim": {"lr": 1e-3, "text_encoder_lr": 5e-4, "max_grad_norm": 0.5},
        "lora": {"rank": 4, "alpha": 4, "init": "orthogonal" if v else "zero"},
        "text_encoder": {"train": not v},
        "loss": {"min_snr_gamma": 5.0, "noise_offset": 0.05, "min_timestep": 10, "max_timestep": 900,
                 **({"type": "huber", "huber_delta": 0.2} if variant == "sdxl" else {})},
        "reg": {"preservation": {"weight": 0.5, "source": "captions", "trigger_words": ["circle"]}},
        "validation": {"every_steps": 2, "num_images": 1, "timesteps": 3, "seed": 1},
        "checkpoint": {"every_steps": 2},
        "export": {"fisher_samples": 3},
        "log": {"tracker": "none"},
    }
    sh("train", "--config", str(write_config(root, cfg)))
    return lines_for(f"{variant} options", trained_files(out), out)


def run(work: Path, variant: str) -> list[str]:
    root = work / variant
    shutil.rmtree(root, ignore_errors=True)
    model, data, out = root / "model", root / "data", root / "run"
    sh("make-tiny-model", str(model), "--seed", "0", "--variant", variant)
    make_images(data)
    cfg = {
        "model": {"path": str(model)}, "data": {"path": str(data), "resolution": 64},
        "output": {"dir": str(out), "name": "fp"},
        "train": {"max_steps": 4, "batch_size": 2, "seed": 3},
        "optim": {"lr": 1e-3, "text_encoder_lr": 5e-4, "alpha_lr": 1e-2},
        "lora": {"rank": 4, "alpha": 3, "init": "compensated", "learnable_alpha": True, "conv": True},
        "text_encoder": {"train": True, "clip_skip": 2},
        "reg": {"embedding_norm": {"weight": 0.1}},
        "checkpoint": {"every_steps": 2},
        "log": {"tracker": "none"},
    }
    sh("train", "--config", str(write_config(root, cfg)))
    files = trained_files(out)
    sh("export", str(out), "--format", "kohya", "--out", str(root / "kohya.safetensors"))
    sh("export", str(out), "--format", "kohya", "--dtype", "fp16", "--out", str(root / "kohya16.safetensors"))
    sh("export", str(out), "--format", "merged-diffusers", "--out", str(root / "merged"), "--base", str(model))
    sh("export", str(out), "--format", "merged-single-file", "--out", str(root / "merged.safetensors"),
       "--base", str(model))
    files["kohya"] = root / "kohya.safetensors"
    files["kohya-fp16"] = root / "kohya16.safetensors"
    files["merged-single-file"] = root / "merged.safetensors"
    for f in sorted((root / "merged").rglob("*.safetensors")):
        files[f"merged-diffusers/{f.relative_to(root / 'merged')}"] = f
    return lines_for(variant, files, out) + run_options(work, variant, model, data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--variants", nargs="+", default=["sd1", "sd2-v", "sdxl"])
    args = ap.parse_args()
    for v in args.variants:
        for line in run(args.work, v):
            print(line, flush=True)


if __name__ == "__main__":
    main()
