"""One trial of a demo recipe: train it on sdlora-mini and judge checkpoints as tests/test_learning.py judges.

    python3 benchmarks/demo_trial.py NAME STEPS [key=json ...]        # overrides on top of demo_recipe
    PRIOR=24 python3 benchmarks/demo_trial.py NAME 450 optim.text_encoder_lr=1e-3 reg.preservation.weight=1

Trains `demo_recipe` (sdlora/commands/demo.py) with the given `dotted.key=json` overrides on the star renders plus
PRIOR digit renders with their captions (prior images; default 0), checkpointing every CKE steps (default 50), and
judges the checkpoints CKS (comma-separated steps; default STEPS-100, STEPS-50, STEPS) on the learning test's 18
trigger samples and 30 unrelated digit prompts (`evaluate_adapter(..., unrelated_per_digit=3)`). Prints one line per
checkpoint: star, digit, colours and unrelated-drawn-as-star, adapted and base. Writes under build/demo_trials/NAME.
docs/mini.md's table of trials was made with it (the rows with prior images by its earlier form).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdlora.commands.demo import demo_recipe, evaluate_adapter, make_concept_dataset  # noqa: E402
from sdlora.config import validate  # noqa: E402
from sdlora.mini import MINI_MODEL_DIR  # noqa: E402
from sdlora.mini.judge import Judge  # noqa: E402
from sdlora.training.checkpoint import list_checkpoints  # noqa: E402
from sdlora.training.loop import train  # noqa: E402
from sdlora.util.allocator import keep_freed_cpu_memory  # noqa: E402


def main(argv: list[str]) -> None:
    keep_freed_cpu_memory()
    name, steps, overrides = argv[0], int(argv[1]), argv[2:]
    root = ROOT / "build" / "demo_trials" / name
    make_concept_dataset(root / "data", n_digits=int(os.environ.get("PRIOR", "0")))
    cfg = demo_recipe(root, steps)
    for item in overrides:
        key, value = item.split("=", 1)
        *path, last = key.split(".")
        node = cfg
        for k in path:
            node = node.setdefault(k, {})
        node[last] = json.loads(value)
    cfg["checkpoint"] = {"every_steps": int(os.environ.get("CKE", "50")), "keep_last": 20}
    t0 = time.perf_counter()
    result = train(validate(cfg), overwrite=True, log=lambda *a, **k: None)
    print(name, "train s", round(time.perf_counter() - t0, 1), flush=True)
    judge = Judge.fit()
    wanted = {int(s) for s in os.environ.get("CKS", f"{steps - 100},{steps - 50},{steps}").split(",")}
    for ck in list_checkpoints(result.out_dir):
        if int(ck.name.split("_")[-1]) in wanted:
            scores, _ = evaluate_adapter(MINI_MODEL_DIR, ck / "adapter.safetensors", judge, unrelated_per_digit=3)
            show = {w: {k: round(v, 3) for k, v in scores[w].items() if isinstance(v, float)} for w in scores}
            print(name, ck.name, show, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
