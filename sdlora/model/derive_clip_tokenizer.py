"""Derive the CLIP tokenizer files (vocab.json, merges.txt) from OpenAI's BPE merge list.

The merge list ships in PyPI packages, e.g. open_clip_torch's `open_clip/bpe_simple_vocab_16e6.txt.gz`
(MIT licence). CLIP keeps the first 49,152 - 256 - 2 merges and builds its vocabulary as: the 256
byte symbols, the same with `</w>`, one token per merge, then `<|startoftext|>` and `<|endoftext|>`:
49,408 tokens. Run once to refresh `sdlora/resources/clip_tokenizer/`:

    python -m sdlora.model.derive_clip_tokenizer path/to/bpe_simple_vocab_16e6.txt.gz
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

from sdlora.model.tiny import _byte_symbols

VOCAB_SIZE = 49408
OUT = Path(__file__).resolve().parent.parent / "resources" / "clip_tokenizer"


def derive(bpe_gz: str | Path, out: Path = OUT) -> int:
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1:VOCAB_SIZE - 256 - 2 + 1 - 256]  # the first line is a header
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return len(vocab)


if __name__ == "__main__":
    print(derive(sys.argv[1]))
