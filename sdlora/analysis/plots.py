"""PNG bar charts for `sdlora inspect --out` (matplotlib, the optional `plots` extra)."""

from __future__ import annotations

import io
from pathlib import Path

from sdlora.errors import UserError
from sdlora.util.atomic import write_bytes


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--out plots need matplotlib: pip install 'sdlora[plots]'") from None
    return plt


def short_name(name: str) -> str:
    """Drop the parts every module shares so that axis labels stay readable."""
    part, _, path = name.partition(".")
    if part.startswith("text_encoder"):  # text_encoder -> te, text_encoder_2 -> te2
        part = "te" + part.removeprefix("text_encoder").lstrip("_")
        path = path.removeprefix("encoder.layers.")
    else:
        for long, short in (("down_blocks.", "down."), ("up_blocks.", "up."), ("mid_block.", "mid.")):
            if path.startswith(long):
                part, path = short.rstrip("."), path.removeprefix(long)
    for long, short in (("attentions.", "at."), ("transformer_blocks.", "tb."), ("resnets.", "res."), (".self_attn.", ".")):
        path = path.replace(long, short)
    return f"{part}.{path}" if path else part


def bar_chart(path: Path, names: list[str], series: list[list], labels: list[str], title: str) -> Path:
    """One bar per module and series (None = the module is absent from that adapter), written atomically."""
    plt = _pyplot()
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(min(30.0, max(6.0, 0.12 * len(names) * len(series) + 2)), 5.0))
    for i, (values, label) in enumerate(zip(series, labels)):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, [0 if v is None else v for v in values], width=width, label=label)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([short_name(n) for n in names], rotation=90, fontsize=5)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    write_bytes(path, buf.getvalue())
    return path
