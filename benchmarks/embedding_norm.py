"""The embedding-norm penalty's effect, measured: the same tiny-model run with an aggressive text-encoder rate,
penalty weight 0 versus > 0. Writes the table into docs/embedding-norm.md (between the benchmark markers).

    python benchmarks/embedding_norm.py                 # ~3-5 minutes on a 2-core CPU
    python benchmarks/embedding_norm.py --steps 40 --seeds 0 --no-write   # a quick look

Columns: final diffusion loss (mean of the last 20 logged steps), the drift probe at the end (mean relative
token-norm drift and mean cosine similarity to the base embeddings, on prompts unrelated to the training
captions), the mean training-step time, and the probe drift along the run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "embedding-norm.md"
START, END = "<!-- benchmark:start -->", "<!-- benchmark:end -->"


def run_once(root: Path, model: Path, data: Path, weight: float, seed: int, args) -> dict:
    from sdlora.config import validate
    from sdlora.training.loop import train

    out = root / f"w{weight}-s{seed}"
    cfg = validate({
        "model": {"path": str(model)},
        "data": {"path": str(data), "resolution": 64},
        "output": {"dir": str(out)},
        "train": {"max_steps": args.steps, "batch_size": 4, "seed": seed},
        "optim": {"lr": 1e-3, "text_encoder_lr": args.te_lr, "max_grad_norm": None},
        "lora": {"rank": 8, "alpha": 8},
        "reg": {"embedding_norm": {"weight": weight}, "probe_every": max(1, args.steps // 4)},
        "log": {"tracker": "none"},
    })
    t0 = time.perf_counter()
    train(cfg, overwrite=True, log=lambda *a, **k: None)
    seconds = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    probes = [json.loads(line) for line in (out / "probe.jsonl").read_text().splitlines()]
    run = json.loads((out / "run.json").read_text())
    tail = [r["diffusion_loss"] for r in rows[-20:]]
    return {"weight": weight, "seed": seed, "diffusion_loss": statistics.mean(tail),
            "drift": probes[-1]["probe/drift"], "cosine": probes[-1]["probe/cosine"],
            "step_seconds": run.get("seconds", seconds) / args.steps,
            "drift_curve": [(p["step"], p["probe/drift"]) for p in probes]}


def table(results: list[dict], weights: list[float]) -> str:
    lines = ["| penalty weight | final diffusion loss | probe drift (rel. norm) | probe cosine | s / step | probe drift along the run |",
             "|---:|---:|---:|---:|---:|---|"]
    for w in weights:
        rs = [r for r in results if r["weight"] == w]
        mean = lambda k: statistics.mean(r[k] for r in rs)  # noqa: E731
        steps = [s for s, _ in rs[0]["drift_curve"]]
        curve = ", ".join(f"{s}: {statistics.mean(r['drift_curve'][i][1] for r in rs):.3f}" for i, s in enumerate(steps))
        lines.append(f"| {w:g} | {mean('diffusion_loss'):.4f} | {mean('drift'):.4f} | {mean('cosine'):.4f} | "
                     f"{mean('step_seconds'):.3f} | {curve} |")
    return "\n".join(lines)


def write_doc(block: str) -> None:
    from sdlora.util import atomic

    text = DOC.read_text(encoding="utf-8")
    if START not in text or END not in text:
        raise SystemExit(f"{DOC} lacks the {START} / {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    atomic.write_text(DOC, f"{head}{START}\n{block}\n{END}{tail}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=160)
    p.add_argument("--te-lr", type=float, default=1e-2, help="text-encoder rate (aggressive on purpose)")
    p.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.01, 0.1, 1.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-write", action="store_true", help="print the table only")
    args = p.parse_args(argv)

    import torch

    from sdlora.commands.demo import make_shapes_dataset
    from sdlora.model.tiny import make_tiny_model

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = make_tiny_model(root / "model", seed=0)
        data = make_shapes_dataset(root / "data", n=16)
        results = []
        for seed in args.seeds:  # interleave weights within each seed so machine drift hits all alike
            for w in args.weights:
                r = run_once(root, model, data, w, seed, args)
                print(f"weight {w:g} seed {seed}: loss {r['diffusion_loss']:.4f} drift {r['drift']:.4f} "
                      f"cosine {r['cosine']:.4f} {r['step_seconds']:.3f} s/step", flush=True)
                results.append(r)
    body = table(results, args.weights)
    command = "python benchmarks/" + Path(__file__).name + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    block = (f"Tiny SD 1.x model (`sdlora make-tiny-model`, seed 0), 16 shapes images at 64 px, batch 4, rank 8, "
             f"{args.steps} steps, UNet rate 1e-3, text-encoder rate {args.te_lr:g}; mean of seeds "
             f"{', '.join(map(str, args.seeds))}.\n\n{body}\n\nProduced by `{command}` on "
             f"{platform.machine()} / {os.cpu_count()} CPUs / torch {torch.__version__}, {time.strftime('%Y-%m-%d')}.")
    print("\n" + block)
    if not args.no_write:
        write_doc(block)
        print(f"\nwritten to {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
