"""Time merge, resize, extract and inspect on every module of an SD 1.5-shaped adapter.

    OMP_NUM_THREADS=2 python3 benchmarks/toolbox.py            # the maths of each command, all ~300 modules
    OMP_NUM_THREADS=2 python3 benchmarks/toolbox.py --every 10  # every 10th module, scaled up (a quick look)

The module shapes are those `sdlora extract` takes from SD 1.5 (UNet attention Linears and 1x1 projections, text
encoder layer Linears; models built on the meta device from the bundled configs, no weights read). Each module
gets a random W0 (float32) and random rank-16 factors, one module at a time, so memory stays small. Timed per
module, summed over the adapter: the per-module maths each command runs (file reading and writing are left out:
they are a few hundred MB at disk speed).

- merge: two rank-16 adapters, svd to rank 16 (algebra.concat_factors + factor_to_rank)
- resize: a rank-32 adapter to --sv-fro 0.9 (factored_singular_values + rank_for + factor_to_rank)
- extract: W_tuned - W0 of a rank-32 update plus fp32 rounding, to rank 16 (dense_to_rank: randomised SVD)
- inspect: one module entry with --base (W0's left singular basis from its Gram matrix, top-10 of W0 + ΔW, norms)

Print a markdown table for docs/benchmarks.md, with the command, machine and date.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdlora.adapter.algebra import (concat_factors, dense_to_rank, factor_to_rank, factored_singular_values,  # noqa: E402
                                    rank_for)
from sdlora.analysis.inspect import module_entry  # noqa: E402
from sdlora.adapter.weights import ModuleDelta  # noqa: E402
from sdlora.commands.extract import extractable  # noqa: E402

CONFIGS = ROOT / "sdlora" / "resources" / "configs" / "sd_v1"


def sd15_shapes() -> list[tuple[str, tuple[int, ...]]]:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    read = lambda part: json.loads((CONFIGS / part / "config.json").read_text())  # noqa: E731
    te_cfg = {k: v for k, v in read("text_encoder").items() if k not in ("architectures", "model_type")}
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(read("unet"))
        te = CLIPTextModel(CLIPTextConfig(**te_cfg))
    return [(f"{c}.{p}", tuple(m.weight.shape)) for c, model in (("unet", unet), ("text_encoder", te))
            for p, m in extractable(c, model, conv=False).items()]


class _Base:
    """What inspect's module_entry asks of its BaseModel, for one module."""

    def __init__(self, w0):
        self.w0 = w0

    def weight(self, name, shape):
        return self.w0

    def basis(self, name, w0):
        from sdlora.analysis.maths import LeftSingularBasis

        return LeftSingularBasis(w0)


def time_module(shape, g) -> dict[str, float]:
    out, k = shape[0], int(torch.tensor(shape[1:]).prod())
    w0 = torch.randn(out, k, generator=g) / k**0.5
    factors = [(torch.randn(r, k, generator=g) / k**0.5, torch.randn(out, r, generator=g) * 0.01) for r in (16, 16, 32)]
    t = {}
    start = time.perf_counter()
    down, up = concat_factors(factors[:2], [1.0, 1.0])
    factor_to_rank(down, up, 16)
    t["merge"] = time.perf_counter() - start
    start = time.perf_counter()
    s = factored_singular_values(*factors[2])
    factor_to_rank(*factors[2], rank_for(s, "sv_fro", 0.9))
    t["resize"] = time.perf_counter() - start
    tuned = w0 + factors[2][1] @ factors[2][0]
    start = time.perf_counter()
    dense_to_rank(tuned.double() - w0.double(), 16)
    t["extract"] = time.perf_counter() - start
    start = time.perf_counter()
    module_entry("unet.x", ModuleDelta(*factors[0]), _Base(w0), 10, 0.5)
    t["inspect"] = time.perf_counter() - start
    return t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--every", type=int, default=1, help="time every n-th module and scale the sums by n")
    args = ap.parse_args()
    shapes = sd15_shapes()
    picked = shapes[:: args.every]
    g = torch.Generator().manual_seed(0)
    totals: dict[str, float] = {}
    for _, shape in picked:
        for op, sec in time_module(shape, g).items():
            totals[op] = totals.get(op, 0.0) + sec
    scale = len(shapes) / len(picked)
    threads = torch.get_num_threads()
    print(f"`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} python3 benchmarks/toolbox.py"
          f"{' --every ' + str(args.every) if args.every > 1 else ''}` on {platform.processor() or platform.machine()}, "
          f"{threads} torch threads, {time.strftime('%Y-%m-%d')}; {len(shapes)} modules"
          f"{f', {len(picked)} timed and scaled' if args.every > 1 else ''}\n")
    print("| command (per-module maths) | seconds, whole SD 1.5 adapter |\n|---|---|")
    for op, sec in totals.items():
        print(f"| {op} | {sec * scale:.1f} |")


if __name__ == "__main__":
    main()
