"""What fits which card: the traced peak of a LoRA step per family and setting (docs/low-memory.md, issue 28 item 5).

    python3 benchmarks/memory_grid.py                       # every family, every setting; resumable
    python3 benchmarks/memory_grid.py --families sd15 --bases bf16,fp8 --ranks 16 --checkpointing on
    python3 benchmarks/memory_grid.py --table               # the markdown table from the stored runs only

Families (the real architectures from the bundled configs, random values, built under FakeTensorMode):
SD 1.5 at 512 px (configs/sd15-character.yaml's options), SD 2.1 768-v at 768 px (configs/sd2-768v.yaml's) and SDXL
at 1024 px (configs/sdxl-character.yaml's), traced
by benchmarks/sdxl_memory.py's step; SD3.5 Medium and Large at 1024 px, traced by benchmarks/sd3_memory.py's step
(the transformer alone on the device). Settings: the frozen base in fp32 (`train.mixed_precision: no`), bf16
(`mixed_precision: bf16`), fp8 or int8 (`model.base_precision`, computing in bf16); gradient checkpointing on or off;
LoRA rank (= alpha) 16 or 32; batch 1; every text encoder frozen with its outputs cached; torch AdamW traced and
bitsandbytes' 8-bit AdamW counted in its place (memory_tracer.with_adam8bit). int4 is not traced: optimum-quanto
does not pack two 4-bit values to a byte under fake tensors, so its trace overcounts (docs/low-memory.md).

Each run is stored in --json as soon as it ends (key: family, base, checkpointing, rank), and a run already stored
is not run again, so the grid can be built in pieces. The GPU estimate and the card classes: memory_tracer.on_gpu
(0.5 GiB CUDA context, 10 % allocator overhead) against CARDS, the usable GiB of 8 / 12 / 16 / 24 GB cards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import sd3_memory  # noqa: E402
import sdxl_memory  # noqa: E402
from memory_tracer import GIB, gib, on_gpu, with_adam8bit  # noqa: E402
from sdlora.training.text_cache import DEFAULT_CAPACITY  # noqa: E402
from sdlora.util import atomic  # noqa: E402

CONFIGS = ROOT / "sdlora" / "resources" / "configs"
# family -> (title, resolution, the shipped config whose options the UNet families use)
FAMILIES = {"sd15": ("SD 1.5", 512, "sd15-character.yaml"), "sd2v": ("SD 2.1 768-v", 768, "sd2-768v.yaml"),
            "sdxl": ("SDXL", 1024, "sdxl-character.yaml"),
            "sd35m": ("SD3.5 Medium", 1024, None), "sd35l": ("SD3.5 Large", 1024, None)}
BASES = {"fp32": ("full", "no"), "bf16": ("full", "bf16"), "fp8": ("fp8", "bf16"), "int8": ("int8", "bf16")}
# usable GiB of a card class: the nominal size in GiB less what nvidia-smi typically keeps (0.4 GiB), as CARD_GIB
CARDS = {"8 GB": 7.6, "12 GB": 11.6, "16 GB": 15.6, "24 GB": 23.6}


def key(family: str, base: str, ckpt: bool, rank: int) -> str:
    return f"{family}/{base}/{'ckpt' if ckpt else 'no-ckpt'}/r{rank}"


def text_cache_bytes(family: str, base: str) -> int:
    """The text-encoder output cache at its capacity, on the device in the encoders' dtype (sdlora's cache;
    SD 1.5: 77 x 768 per caption, SDXL 77 x 2048 + 1280); none for SD3, whose run keeps no encoder on the device."""
    per = {"sd15": 77 * 768, "sd2v": 77 * 1024, "sdxl": 77 * 2048 + 1280}.get(family, 0)
    return DEFAULT_CAPACITY * per * (4 if base == "fp32" else 2)


def run(family: str, base: str, ckpt: bool, rank: int) -> dict:
    precision, mixed = BASES[base]
    if family in ("sd15", "sd2v", "sdxl"):
        title, px, config = FAMILIES[family]
        folder = CONFIGS / {"sd15": "sd_v1", "sd2v": "sd_v2_v", "sdxl": "sdxl_base_v1-0"}[family]
        cfg = sdxl_memory.sdxl_config(ckpt, {"model": {"base_precision": precision}, "lora": {"rank": rank, "alpha": rank},
                                             "train": {"mixed_precision": mixed}}, path=ROOT / "configs" / config)
        widths = {"sd15": (768,), "sd2v": (1024,), "sdxl": (768, 1280)}[family]
        r = sdxl_memory.trace(folder, px, cfg, fake=True, widths=widths)
    else:
        model = {"sd35m": "sd3.5_medium", "sd35l": "sd3.5_large"}[family]
        config = json.loads((CONFIGS / model / "transformer" / "config.json").read_text())
        r = sd3_memory.trace(config, 1024, sd3_memory.sd3_config(ckpt, rank, precision, mixed), fake=True)
    lora = sum(n * s for n, s in r["trained"])
    return {"peak": r["peak"], "peak_phase": r["peak_phase"], "peak_adam8bit": with_adam8bit(r),
            "frozen_bytes": r["peak"]["parameters"] + r["peak"].get("buffers", 0) - lora, "lora_bytes": lora,
            "trained_parameters": sum(n for n, _ in r["trained"]), "seconds": round(r["step_seconds"] * 2 + r["build_seconds"])}


def smallest_card(allocated: int) -> str:
    need = on_gpu(allocated) / GIB
    return next((name for name, usable in CARDS.items() if need <= usable), "over 24 GB")


def table(runs: dict) -> str:
    lines = ["| family | base | gradient checkpointing | rank | frozen weights, GiB | traced peak, GiB (phase) "
             "| + text cache | **GPU estimate, AdamW** | **GPU estimate, 8-bit AdamW** | smallest card (AdamW / 8-bit) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for k, r in runs.items():
        family, base, ckpt, rank = k.split("/")
        cache = text_cache_bytes(family, base)
        adam, adam8 = r["peak"]["total"] + cache, r["peak_adam8bit"] + cache
        lines.append(f"| {FAMILIES[family][0]} | {base} | {'on' if ckpt == 'ckpt' else 'off'} | {rank[1:]} "
                     f"| {gib(r['frozen_bytes'])} | {gib(r['peak']['total'])} ({r['peak_phase']}) | {gib(cache)} "
                     f"| **{gib(on_gpu(adam))}** | **{gib(on_gpu(adam8))}** | {smallest_card(adam)} / {smallest_card(adam8)} |")
    return "\n".join(lines)


def ordered(runs: dict) -> dict:
    order = {k: i for i, k in enumerate(key(f, b, c, r) for f in FAMILIES for b in BASES for c in (True, False)
                                        for r in (16, 32))}
    return dict(sorted(runs.items(), key=lambda kv: order.get(kv[0], len(order))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--bases", default=",".join(BASES))
    ap.add_argument("--checkpointing", default="on,off")
    ap.add_argument("--ranks", default="16,32")
    ap.add_argument("--json", default=str(ROOT / "docs" / "memory-grid.json"))
    ap.add_argument("--table", action="store_true", help="print the table from --json, trace nothing")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    path = Path(args.json)
    store = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    if not args.table:
        for family in args.families.split(","):
            for ckpt in (c == "on" for c in args.checkpointing.split(",")):
                for base in args.bases.split(","):
                    for rank in (int(r) for r in args.ranks.split(",")):
                        k = key(family, base, ckpt, rank)
                        if k in store["runs"]:
                            continue
                        t0 = time.perf_counter()
                        store["runs"][k] = run(family, base, ckpt, rank)
                        store["runs"] = ordered(store["runs"])
                        store["machine"] = f"{platform.machine()}, 1 thread, torch {torch.__version__}"
                        atomic.write_json(path, store)
                        print(f"{k}: peak {gib(store['runs'][k]['peak']['total'])} GiB "
                              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    print(table(ordered(store["runs"])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
