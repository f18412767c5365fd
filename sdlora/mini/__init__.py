"""sdlora-mini: a small SD 1.x model trained here on real data (scikit-learn's handwritten digits), its data
renderer and a judge that scores what a model draws. See docs/mini.md."""

from pathlib import Path

MINI_MODEL_DIR = Path(__file__).resolve().parent.parent / "resources" / "mini"
