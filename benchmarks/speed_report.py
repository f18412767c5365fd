"""train_speed.py's report: per-variant results, paired ratios, the markdown table, the docs page, the JSON summary."""

from __future__ import annotations

import dataclasses
import datetime
import platform
import statistics
import sys
from pathlib import Path

import torch

from sdlora.util import atomic


@dataclasses.dataclass(frozen=True)
class Result:
    name: str
    seconds: list[float]
    peak_bytes: int  # during the step, above what the process held before it
    persistent: int  # adapter factors and the optimiser state


def paired_ratio(v, ref) -> float:
    """Median over rounds of v's time over ref's time in the same round."""
    return statistics.median(a / b for a, b in zip(v.seconds, ref.seconds))


def table(variants, extra_ref: str | None = None) -> str:
    """The markdown table; `extra_ref` (a variant's name) adds a column of paired ratios to that variant."""
    by = {v.name: v for v in variants}
    mib = {v.name: (v.peak_bytes + v.persistent) / 2**20 for v in variants}
    refs = ("floor", "floor+te_bwd", "peer") + ((extra_ref,) if extra_ref else ())
    rows = ["| variant | s/step median (best) | " + " | ".join(f"x {r}" for r in refs) + " | x peer, best rounds "
            "| peak MiB | MiB x peer |", "|---|---|---|---|---|---|---|---|" + "---|" * bool(extra_ref)]
    for name, v in by.items():
        cells = [f"{paired_ratio(v, by[ref]):.3f}" if ref in by else "-" for ref in refs]
        best = f"{min(v.seconds) / min(by['peer'].seconds):.3f}" if "peer" in by else "-"
        mp = f"{mib[name] / mib['peer']:.3f}" if "peer" in mib else "-"
        rows.append(f"| {name} | {statistics.median(v.seconds):.3f} ({min(v.seconds):.3f}) | {' | '.join(cells)} | {best} "
                    f"| {mib[name]:.0f} | {mp} |")
    return "\n".join(rows)


def write_doc(path: Path, tbl: str, args, device, steps_s, *, model: str | None = None,
              script: str = "train_speed.py") -> None:
    """This device's (and family's) table in the page, between its markers; `model` names the model in the heading
    (default: the family's), `script` the command that made it."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "none"
    model = model or {"sd1": "SD 1.5", "sdxl": "SDXL"}[args.family]
    model += " (tiny: smoke run, numbers meaningless)" if args.arch == "tiny" else ""
    bases = f", base {'/'.join(args.base_precisions)} vs {args.dtype}" if getattr(args, "base_precisions", None) else ""
    section = (f"## {model}, {device.type.upper()}, {args.resolution} px, {args.dtype}{bases}, batch 1\n\n"
               f"Command: `python3 benchmarks/{script} {' '.join(sys.argv[1:])}`  \n"
               f"Machine: {cpu}, {torch.get_num_threads()} threads, GPU: {gpu}; torch {torch.__version__}  \n"
               f"Date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; {args.warmup} warm-up + {args.steps}"
               f" timed rounds{' + 1 memory round' if device.type == 'cpu' else ''}; run took {steps_s:.0f} s\n\n{tbl}\n")
    marker = f"<!-- table:{device.type} -->" if args.family == "sd1" else f"<!-- table:{args.family}:{device.type} -->"
    if getattr(args, "base_precisions", None):  # a low-bit comparison has its own section
        marker = marker.replace(" -->", ":base-precision -->")
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    if marker in old:  # replace this device's table, keep the rest of the page
        head, _, rest = old.partition(marker)
        tail = rest.partition("<!-- /table -->")[2]
        text = f"{head}{marker}\n{section}<!-- /table -->{tail}"
    else:
        text = old.rstrip() + f"\n\n{marker}\n{section}<!-- /table -->\n"
    atomic.write_text(path, text)


def summary(results: list[Result]) -> dict:
    """Per variant: seconds per step (median, best), the paired ratios to floor, floor+te_bwd and peer (None where
    that reference did not run), and the peak memory in MiB (step peak + persistent adapter state)."""
    by = {r.name: r for r in results}
    out = {}
    for r in results:
        out[r.name] = {"s_median": statistics.median(r.seconds), "s_best": min(r.seconds),
                       "peak_mib": (r.peak_bytes + r.persistent) / 2**20, "rounds": len(r.seconds),
                       **{f"x_{ref.replace('+', '_')}": paired_ratio(r, by[ref]) if ref in by else None
                          for ref in ("floor", "floor+te_bwd", "peer")}}
    return out
