"""The embedding-norm penalty's effect, measured: the same tiny-model run with an aggressive text-encoder rate,
penalty weight 0 versus > 0. Writes the table into docs/embedding-norm.md (between the benchmark markers; SD3's
between the benchmark-sd3 markers).

    python benchmarks/embedding_norm.py                 # ~3-5 minutes on a 2-core CPU
    python benchmarks/embedding_norm.py --steps 40 --seeds 0 --no-write   # a quick look
    python benchmarks/embedding_norm.py --family sd3 --steps 100 --seeds 0 1 --weights 0 0.01 0.1 1

--family sd3: the tiny SD3.5 Medium (`sdlora make-tiny-model --variant sd35m`, T5 frozen, the default) with both
CLIP encoders trained; one weight for every text output (reg.embedding_norm.weight; the pooled halves take their
encoder's), and the probe drift of each CLIP's tokens and of each CLIP's half of the pooled vector.

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
# The probe's key prefix of each text output the table reports, per family (probe.jsonl: probe/drift is the first
# encoder's, probe/<output>/drift each other output's).
OUTPUTS = {"sd1": {"": "CLIP"},
           "sd3": {"": "CLIP-L", "text_encoder_2/": "CLIP-G", "pooled_l/": "pooled CLIP-L", "pooled/": "pooled CLIP-G"}}


def run_once(root: Path, model: Path, data: Path, weight: float, seed: int, args) -> dict:
    from sdlora.config import validate
    from sdlora.training.loop import train

    out = root / f"w{weight}-s{seed}"
    sd3 = args.family == "sd3"
    cfg = validate({
        "model": {"path": str(model)},
        "data": {"path": str(data), "resolution": 64},
        "output": {"dir": str(out)},
        "train": {"max_steps": args.steps, "batch_size": 4, "seed": seed},
        "optim": {"lr": 1e-3, "text_encoder_lr": args.te_lr, "max_grad_norm": None},
        "lora": {"rank": 8, "alpha": 8},
        "reg": {"embedding_norm": {"weight": weight}, "probe_every": max(1, args.steps // 4)},
        "log": {"tracker": "none"},
        **({"text_encoder": {"train": True, "t5_max_length": 16}} if sd3 else {}),
    })
    t0 = time.perf_counter()
    train(cfg, overwrite=True, log=lambda *a, **k: None)
    seconds = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    probes = [json.loads(line) for line in (out / "probe.jsonl").read_text().splitlines()]
    run = json.loads((out / "run.json").read_text())
    tail = [r["diffusion_loss"] for r in rows[-20:]]
    outputs = {prefix: {"drift": probes[-1][f"probe/{prefix}drift"], "cosine": probes[-1][f"probe/{prefix}cosine"]}
               for prefix in OUTPUTS[args.family]}
    return {"weight": weight, "seed": seed, "diffusion_loss": statistics.mean(tail),
            "drift": probes[-1]["probe/drift"], "cosine": probes[-1]["probe/cosine"], "outputs": outputs,
            "step_seconds": run.get("seconds", seconds) / args.steps,
            "drift_curve": [(p["step"], p["probe/drift"]) for p in probes]}


def output_table(results: list[dict], weights: list[float], family: str) -> str:
    """Per text output: the final probe drift (and cosine) at each weight, and the reduction against weight 0."""
    names = OUTPUTS[family]
    lines = ["| penalty weight | final diffusion loss | " + " | ".join(f"{n} drift (cos)" for n in names.values())
             + " | " + " | ".join(f"{n} drift off / on" for n in names.values()) + " |",
             "|---:|---:|" + "---:|" * (2 * len(names))]
    mean = lambda rs, p, k: statistics.mean(r["outputs"][p][k] for r in rs)  # noqa: E731
    off = [r for r in results if r["weight"] == 0]
    for w in weights:
        rs = [r for r in results if r["weight"] == w]
        cells = [f"{mean(rs, p, 'drift'):.4f} ({mean(rs, p, 'cosine'):.3f})" for p in names]
        ratios = [f"{mean(off, p, 'drift') / mean(rs, p, 'drift'):.1f}x" if off and mean(rs, p, "drift") > 0 else "-"
                  for p in names]
        lines.append(f"| {w:g} | {statistics.mean(r['diffusion_loss'] for r in rs):.4f} | " + " | ".join(cells + ratios)
                     + " |")
    return "\n".join(lines)


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


def write_doc(block: str, start: str = START, end: str = END) -> None:
    from sdlora.util import atomic

    text = DOC.read_text(encoding="utf-8")
    if start not in text or end not in text:
        raise SystemExit(f"{DOC} lacks the {start} / {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    atomic.write_text(DOC, f"{head}{start}\n{block}\n{end}{tail}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=160)
    p.add_argument("--te-lr", type=float, default=1e-2, help="text-encoder rate (aggressive on purpose)")
    p.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.01, 0.1, 1.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument("--family", choices=sorted(OUTPUTS), default="sd1", help="the tiny model: SD 1.x or SD3.5 Medium")
    args = p.parse_args(argv)

    import torch

    from sdlora.commands.demo import make_shapes_dataset
    from sdlora.model.tiny import make_tiny_model

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.family == "sd3":
            from sdlora.model.tiny_sd3 import make_tiny_sd3

            model = make_tiny_sd3(root / "model", seed=0, variant="sd35m")
        else:
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
    model_words = ("Tiny SD3.5 Medium (`sdlora make-tiny-model --variant sd35m`, seed 0; CLIP-L and CLIP-G trained, "
                   "T5 frozen at 16 tokens)" if args.family == "sd3" else "Tiny SD 1.x model (`sdlora make-tiny-model`, seed 0)")
    denoiser = "transformer" if args.family == "sd3" else "UNet"
    if args.family == "sd3":
        body = output_table(results, args.weights, args.family)
    block = (f"{model_words}, 16 shapes images at 64 px, batch 4, rank 8, "
             f"{args.steps} steps, {denoiser} rate 1e-3, text-encoder rate {args.te_lr:g}; mean of seeds "
             f"{', '.join(map(str, args.seeds))}.\n\n{body}\n\nProduced by `{command}` on "
             f"{platform.machine()} / {os.cpu_count()} CPUs / torch {torch.__version__}, {time.strftime('%Y-%m-%d')}.")
    print("\n" + block)
    if not args.no_write:
        write_doc(block, *(("<!-- benchmark-sd3:start -->", "<!-- benchmark-sd3:end -->") if args.family == "sd3"
                           else (START, END)))
        print(f"\nwritten to {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
