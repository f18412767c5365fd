"""The mini model's skill by the judge (docs/mini.md): digit and colour accuracy on training and held-out
colour/digit combinations, fixed seeds, DDIM 25 steps, CFG 4; and the judge's own accuracy on real renders.

    python benchmarks/mini_skill.py [--model DIR] [--seeds-train 2] [--seeds-held-out 6] [--out build/mini_skill]
                                    [--base-precision full|fp8|int8|int4]

--base-precision stores the UNet's and the text encoder's Linear / Conv2d weights as training's
model.base_precision does (sdlora/model/low_bits.store_low_bits; upcast to fp32 layer by layer), so the table is
the skill of the quantised base itself, with no adapter.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sdlora.util.allocator import keep_freed_cpu_memory  # noqa: E402
from sdlora.mini import MINI_MODEL_DIR  # noqa: E402
from sdlora.mini.data import DIGIT_WORDS, STROKES  # noqa: E402
from sdlora.mini.judge import Judge, accuracy_on_real_renders  # noqa: E402
from sdlora.model.low_bits import BASE_PRECISIONS, library_missing, store_low_bits  # noqa: E402
from sdlora.mini.skill import GUIDANCE, SAMPLE_STEPS, load_pipeline, sample, skill_table  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(MINI_MODEL_DIR))
    ap.add_argument("--seeds-train", type=int, default=2, help="seeds per training combination (162 combinations)")
    ap.add_argument("--seeds-held-out", type=int, default=6, help="seeds per held-out combination (18 combinations)")
    ap.add_argument("--out", default="build/mini_skill")
    ap.add_argument("--base-precision", default="full", choices=BASE_PRECISIONS,
                    help="store the UNet and text encoder weights in this form (model.base_precision)")
    args = ap.parse_args(argv)
    keep_freed_cpu_memory()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    judge = Judge.fit()
    own = accuracy_on_real_renders(judge)
    print(f"judge on renders of unseen scans: digit {own['digit']:.1%} ({own['n_digits']}), star {own['concept']:.1%} "
          f"({own['n_glyphs']}), colours {own['colour']:.1%}")
    pipe = load_pipeline(args.model)
    if missing := library_missing(args.base_precision):
        ap.error(missing)
    stored = sum(store_low_bits(m, args.base_precision) for m in (pipe.unet, pipe.text_encoder))
    print(f"base precision {args.base_precision}: {stored} Linear / Conv2d weights stored")
    rows = skill_table(pipe, judge, seeds_train=args.seeds_train, seeds_held_out=args.seeds_held_out)
    print("\n| combinations | samples | digit | stroke colour | colours (stroke and background) |\n|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['n']} | {r['shape']:.1%} | {r['stroke']:.1%} | {r['colour']:.1%} |")
    # a picture: each digit (rows) in each stroke colour (columns) on navy, seed 0
    prompts = [f"a {s} {DIGIT_WORDS[d]} on a navy background" for d in range(10) for s in STROKES]
    imgs = sample(pipe, prompts, [0] * len(prompts))
    grid = np.concatenate([np.concatenate(imgs[r * len(STROKES):(r + 1) * len(STROKES)], 1) for r in range(10)], 0)
    from PIL import Image

    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(out / "grid.png")
    record = {"command": " ".join(["python", "benchmarks/mini_skill.py", *(argv or sys.argv[1:])]), "judge": own,
              "sampler": {"scheduler": "DDIM", "steps": SAMPLE_STEPS, "guidance": GUIDANCE},
              "rows": {k: {kk: vv for kk, vv in v.items() if kk != "labels"} for k, v in rows.items()},
              "base_precision": args.base_precision, "seconds": round(time.perf_counter() - t0, 1)}
    (out / "skill.json").write_text(json.dumps(record, indent=1))
    print(f"\n{record['seconds']}s; {out / 'skill.json'}, {out / 'grid.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
