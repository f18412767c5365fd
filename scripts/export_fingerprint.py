"""Fingerprint what a fixed run writes, through the public CLI only, so two versions of sdlora can be compared.

For the tiny SD 1.x and SD 2.x-v models: trains a fixed config (compensated init, learnable alpha, text encoder,
conv, penalty, clip skip 2), then writes the kohya, merged-diffusers and merged-single-file exports, and prints
one sha256 per file over its tensors (name, dtype, shape, bytes) and one over its metadata without the fields
that hold a time or a path. A redesign that changes no behaviour prints the same lines before and after it:

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
    cfg_path = root / "config.json"
    import yaml

    cfg_path.with_suffix(".yaml").write_text(yaml.safe_dump(cfg))
    sh("train", "--config", str(cfg_path.with_suffix(".yaml")))
    files = {"adapter": out / "adapter.safetensors"}
    ckpt = sorted((out / "checkpoints").glob("step_*"))[-1]
    for f in sorted(ckpt.glob("*.safetensors")):
        files[f"checkpoint/{f.name}"] = f
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
    lines = []
    for name, path in files.items():
        tensors, meta = fingerprint_file(path)
        lines.append(f"{variant} {name}: tensors {tensors} metadata {meta}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--variants", nargs="+", default=["sd1", "sd2-v"])
    args = ap.parse_args()
    for v in args.variants:
        for line in run(args.work, v):
            print(line, flush=True)


if __name__ == "__main__":
    main()
