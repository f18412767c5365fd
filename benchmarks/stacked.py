"""Two LoRAs on sdlora-mini, stacked and merged: unmerged, merged by svd, merged by fisher at the same rank; and each
resized to half its rank, plain vs Fisher-weighted (FWSVD).

    OMP_NUM_THREADS=2 python3 benchmarks/stacked.py                 # the full run (CPU; the lead runs it)
    OMP_NUM_THREADS=2 python3 benchmarks/stacked.py --quick         # a few steps: checks the script end to end

Two LoRAs are trained with the demo's recipe (`commands/demo.demo_config`), each on its own concept: the star
(`sks`) and the heart (`zwx`, mini/data.CONCEPT_2), 24 renders each, with `export.fisher_samples` so each adapter
carries its row Fisher. Then, sampled with fixed seeds and scored by the judge (mini/judge.py):

- rows: base model; each LoRA alone; both applied together unmerged (diffusers, two adapters at weight 1); merged
  by `svd` and by `fisher` at --rank (default: one LoRA's rank); each LoRA resized to rank/2, plain and --fisher.
- columns: the star's and the heart's concept score (share of trigger prompts drawn as that glyph), and on the
  base prompts (digits, training combinations) the digit and colour accuracy.

Note what is compared: svd is the best rank-R approximation of the *sum* ΔW_star + ΔW_heart; fisher is
Matena & Raffel's Fisher-weighted *average* (rows the two share get c_star·ΔW_star + c_heart·ΔW_heart with
c summing to 1) re-factored by FWSVD. Writes <out>/stacked.json and <out>/stacked.md (a table fragment for
docs/toolbox.md).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdlora.commands.demo import demo_config, make_concept_dataset  # noqa: E402
from sdlora.commands.merge import run_merge  # noqa: E402
from sdlora.commands.resize import run_resize  # noqa: E402
from sdlora.config import validate  # noqa: E402
from sdlora.mini import MINI_MODEL_DIR  # noqa: E402
from sdlora.mini.data import CONCEPT, CONCEPT_2  # noqa: E402
from sdlora.mini.judge import Judge, accuracy_on_real_renders  # noqa: E402
from sdlora.mini.skill import concept_cases, digit_cases, load_pipeline, sample, score  # noqa: E402
from sdlora.training.loop import train  # noqa: E402
from sdlora.util import atomic  # noqa: E402

CONCEPTS = {"star": CONCEPT, "heart": CONCEPT_2}


def quiet(*_a, **_k):
    pass


def train_concept(root: Path, name: str, concept: int, steps: int, fisher_samples: int, seed: int) -> Path:
    folder = root / name
    make_concept_dataset(folder / "data", concept=concept, seed=seed)
    cfg = demo_config(folder, steps, seed=seed)
    cfg["export"] = {"fisher_samples": fisher_samples}
    cfg["optim"]["warmup_steps"] = min(cfg["optim"]["warmup_steps"], steps)
    cfg["output"]["name"] = f"stacked-{name}"
    return train(validate(cfg), overwrite=True, log=quiet).adapter_path


def evaluate(pipe, judge, cases, steps: int) -> dict:
    """Each concept's score on its trigger prompts, and digit / colour accuracy on the base prompts."""
    out = {}
    for name, (prompts, seeds, truth) in cases["concepts"].items():
        out[name] = score(judge, sample(pipe, prompts, seeds, steps=steps), truth)["shape"]
    prompts, seeds, truth = cases["digits"]
    s = score(judge, sample(pipe, prompts, seeds, steps=steps), truth)
    out["digit"], out["colour"] = s["shape"], s["colour"]
    return out


def with_adapters(pipe, paths: list[Path]):
    """Load each adapter under its own name, all at weight 1 (diffusers' multi-adapter stacking, nothing merged)."""
    names = [f"a{i}" for i in range(len(paths))]
    for n, p in zip(names, paths):
        pipe.load_lora_weights(str(p), adapter_name=n)
    if len(names) > 1:
        pipe.set_adapters(names, [1.0] * len(names))
    return pipe


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few steps and samples: checks the script end to end")
    ap.add_argument("--steps", type=int, default=None, help="training steps per LoRA (default: 400; --quick 3)")
    ap.add_argument("--rank", type=int, default=8, help="rank of the svd / fisher merges (default 8: one LoRA's)")
    ap.add_argument("--fisher-samples", type=int, default=None, help="row-Fisher samples per LoRA (64; --quick 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "stacked"))
    ap.add_argument("--work", default=None, help="folder for the runs (default: a temporary one)")
    args = ap.parse_args(argv)
    steps = args.steps or (3 if args.quick else 400)
    fisher_samples = args.fisher_samples or (2 if args.quick else 64)
    sample_steps = 4 if args.quick else 25
    seeds_per_case = 1 if args.quick else 4
    t0 = time.perf_counter()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="sdlora-stacked-"))
    out = Path(args.out)

    judge = Judge.fit(n_digits=300, n_glyphs=30) if args.quick else Judge.fit()
    own = accuracy_on_real_renders(judge, n_digits=200 if args.quick else 1000, n_glyphs=20 if args.quick else 100)
    print(f"judge: digits {own['digit']:.1%}, star {own['concept']:.1%}, heart {own['concept_2']:.1%}")

    adapters = {name: train_concept(work, name, c, steps, fisher_samples, args.seed + i)
                for i, (name, c) in enumerate(CONCEPTS.items())}
    print(f"trained {', '.join(adapters)} in {time.perf_counter() - t0:.0f}s")

    cases = {"concepts": {name: concept_cases(seeds_per_case, first_seed=500 + 100 * i, concept=c)
                          for i, (name, c) in enumerate(CONCEPTS.items())},
             "digits": digit_cases(False, seeds_per_case, first_seed=1000, backgrounds=["black"] if args.quick else None)}
    if args.quick:  # a third of each case list: the script's path, not its numbers
        cases = {"concepts": {n: tuple(x[::3] for x in c) for n, c in cases["concepts"].items()},
                 "digits": tuple(x[::3] for x in cases["digits"])}
    paths = list(adapters.values())
    files = {}
    errors = {}
    for method in ("svd", "fisher"):
        files[f"merged {method} r{args.rank}"] = work / f"merged_{method}.safetensors"
        _, rows = run_merge([str(p) for p in paths], files[f"merged {method} r{args.rank}"], method=method,
                            rank=args.rank, force=True, report=quiet)
        errors[f"merged {method} r{args.rank}"] = max(r["relative_error"] for r in rows)
    half = max(1, args.rank // 2)
    for name, p in adapters.items():
        for fisher in (False, True):
            label = f"{name} resized r{half}{' fisher' if fisher else ''}"
            files[label] = work / f"{name}_r{half}{'_fisher' if fisher else ''}.safetensors"
            _, rows = run_resize(p, files[label], "rank", half, fisher=fisher, force=True, report=quiet)
            errors[label] = min(r["retained"] for r in rows)

    pipe = load_pipeline(MINI_MODEL_DIR)
    results = {"base": evaluate(pipe, judge, cases, sample_steps)}
    variants = {f"{n} alone": [p] for n, p in adapters.items()}
    variants["both, unmerged"] = paths
    variants.update({label: [f] for label, f in files.items()})
    for label, ps in variants.items():
        with_adapters(pipe, ps)
        results[label] = evaluate(pipe, judge, cases, sample_steps)
        pipe.unload_lora_weights()
        print(f"{label}: " + ", ".join(f"{k} {v:.0%}" for k, v in results[label].items()))

    seconds = round(time.perf_counter() - t0, 1)
    header = ("| variant | star (`sks`) | heart (`zwx`) | digit | colour | merge: largest rel. error / "
              "resize: least |dW|_F kept |\n|---|---|---|---|---|---|")
    lines = [header] + [f"| {label} | {r['star']:.0%} | {r['heart']:.0%} | {r['digit']:.0%} | {r['colour']:.0%} | "
                        f"{errors[label]:.3f} |" if label in errors else
                        f"| {label} | {r['star']:.0%} | {r['heart']:.0%} | {r['digit']:.0%} | {r['colour']:.0%} | |"
                        for label, r in results.items()]
    cmd = "python3 benchmarks/stacked.py" + (" --quick" if args.quick else "")
    lines.append(f"\n`{cmd}`: {steps} steps per LoRA, rank {args.rank} merges, {fisher_samples} Fisher samples, "
                 f"{seeds_per_case} seed(s) per case, {sample_steps} DDIM steps; {platform.processor() or platform.machine()}, "
                 f"{time.strftime('%Y-%m-%d')}, {seconds}s.")
    table = "\n".join(lines) + "\n"
    atomic.write_text(out / "stacked.md", table)
    atomic.write_json(out / "stacked.json", {"args": vars(args), "steps": steps, "fisher_samples": fisher_samples,
                                             "judge": own, "results": results, "errors": errors, "seconds": seconds})
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
