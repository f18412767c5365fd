"""The long runs' curves (docs/quality.md): concept learned and what the rest of the model kept, checkpoint by
checkpoint, per row (mean over seeds, the band is the seeds' min-max), from the quality.json of
`python benchmarks/quality.py --steps 1500 --check-every 150 --full-curve ...` runs.

    python benchmarks/quality_curves.py build/qlong1/quality.json build/qlong2/quality.json --out docs/quality/long.png
    python benchmarks/quality_curves.py build/ql*/quality.json --rows a te0.01 te0.01+dir --out docs/quality/long-te.png

A row's seeds may come from several files (one file per seed, say): they are pooled.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sdlora.util.atomic import write_bytes  # noqa: E402

PANELS = (("concept", "concept learned (trigger prompts drawn as the star)", False),
          ("train_digit", "unrelated prompts: digit accuracy, points vs the base", True),
          ("unrelated_as_concept", "unrelated prompts drawn as the star", False),
          ("unrelated_distance", "unrelated samples' RMS distance to the base's", False))

SHORT = {"concept": "concept", "train_digit": "unrelated digit (points vs base)",
         "unrelated_as_concept": "unrelated drawn as the star", "unrelated_distance": "distance to the base's samples"}


def curves(parts: list[dict], keep: list[str] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """{row: {"steps": (n,), column: (seeds, n)}} from quality.json parts whose runs carry "full_curve"; with
    `keep`, only those rows, in that order."""
    out: dict[str, dict] = {}
    for part in parts:
        for key, runs in part["rows"].items():
            if keep is not None and key not in keep:
                continue
            runs = [r for r in runs if r.get("full_curve")]
            if not runs:
                continue
            steps = [s for s, _ in runs[0]["full_curve"]]
            row = out.setdefault(key, {"steps": np.array(steps), "label": part["labels"][key], "base": part["base"]})
            for col, _, _ in PANELS:
                vals = [[j[col] for _, j in r["full_curve"]] for r in runs]
                row[col] = np.concatenate([row.get(col, np.empty((0, len(steps)))), np.array(vals, float)])
    if keep is not None:
        out = {k: out[k] for k in keep if k in out}
    return out


def picture(rows: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4.2))
    for ax, (col, title, relative) in zip(axes, PANELS):
        for key, row in rows.items():
            v = row[col] - (row["base"][col] if relative else 0)
            v = 100 * v if col != "unrelated_distance" else v
            line, = ax.plot(row["steps"], v.mean(0), marker="o", ms=3, label=f"{key} ({len(v)} seeds)")
            ax.fill_between(row["steps"], v.min(0), v.max(0), color=line.get_color(), alpha=0.15)
        ax.set_title(title, fontsize=9)
        if col != "unrelated_distance":  # percentages on one fixed scale, so rows and pictures compare
            ax.set_ylim(*((-102, 2) if relative else (-2, 102)))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes(path, buf.getvalue())


def summary(rows: dict[str, dict], at: list[int] | None = None) -> str:
    """A markdown table: each panel's column at the checkpoints `at` (default: the first and the last), mean ± standard
    deviation over the seeds (numpy's, ddof 0, as benchmarks/quality.py's table), points vs the base where the panel
    is relative."""
    any_row = next(iter(rows.values()))
    at = at or [int(any_row["steps"][0]), int(any_row["steps"][-1])]
    head = ["row (seeds)"] + [f"{SHORT[col]}, step {' → '.join(map(str, at))}" for col, _, _ in PANELS]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for key, row in rows.items():
        cells = [f"{key} ({len(row[PANELS[0][0]])})"]
        for col, _, relative in PANELS:
            v = row[col] - (row["base"][col] if relative else 0)
            idx = [list(row["steps"]).index(s) for s in at]
            if col == "unrelated_distance":
                cells.append(" → ".join(f"{v[:, i].mean():.3f} ± {v[:, i].std():.3f}" for i in idx))
            else:
                sign = "+" if relative else ""
                cells.append(" → ".join(f"{100 * v[:, i].mean():{sign}.0f}{'' if relative else '%'} ± "
                                        f"{100 * v[:, i].std():.0f}" for i in idx))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parts", nargs="+", metavar="QUALITY_JSON")
    ap.add_argument("--out", required=True, help="the PNG to write")
    ap.add_argument("--rows", nargs="+", default=None, help="only these rows, in this order (default: every row)")
    ap.add_argument("--at", nargs="+", type=int, default=None,
                    help="print a markdown table of every panel's column at these checkpoints (default: first, last)")
    args = ap.parse_args(argv)
    rows = curves([json.loads(Path(p).read_text()) for p in args.parts], args.rows)
    if not rows:
        raise SystemExit("quality_curves: no run in these files was judged with --full-curve")
    picture(rows, Path(args.out))
    for key, row in rows.items():
        print(key, "steps", row["steps"].tolist())
        for col, _, rel in PANELS:
            v = row[col] - (row["base"][col] if rel else 0)
            print(f"  {col}: " + " ".join(f"{m:.3g}±{s:.2g}" for m, s in zip(v.mean(0), v.std(0))))
    print()
    print(summary(rows, args.at))
    return 0


if __name__ == "__main__":
    sys.exit(main())
