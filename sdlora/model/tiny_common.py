"""What the tiny models share (model/tiny.py: SD 1.x, 2.x, SDXL; model/tiny_sd3.py: SD3): a byte-level CLIP
tokenizer written offline, and random weights spread the way trained ones are."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's byte-to-unicode table, as the 256 symbols a byte-level BPE vocabulary starts with."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


# A few merges so that common caption words are single tokens (keeps token counts realistic).
_TINY_WORDS = ["a", "photo", "of", "the", "red", "blue", "green", "circle", "square", "cat", "dog", "painting",
               "style", "on", "background", "with", "and", "in", "sks", "person", "white", "black", "yellow"]


def write_tiny_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> None:
    """A CLIP tokenizer built from scratch: byte symbols, their end-of-word forms, merges for a few words.
    `pad_token="!"` makes SDXL's second tokenizer (OpenCLIP pads with "!", id 0, not with end-of-text)."""
    symbols = _byte_symbols()
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    known = set(vocab_list)
    for word in _TINY_WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            a, b = parts[0], parts[1]
            merged = a + b
            if f"{a} {b}" not in merges:
                merges.append(f"{a} {b}")
            if merged not in known:
                vocab_list.append(merged)
                known.add(merged)
            parts = [merged] + parts[2:]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "clean_up_tokenization_spaces": True, **special}), encoding="utf-8")


def _randomise(models, text_encoders, gen: torch.Generator) -> None:
    with torch.no_grad():
        for model in (*models, *text_encoders):
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05 if p.dim() > 1 else p)
        # A trained CLIP's layer norms are not (1, 0); with (1, 0) every output token of the final layer norm
        # has norm exactly sqrt(hidden), and embedding-norm measurements on the tiny model would be meaningless.
        for text_encoder in text_encoders:
            for m in text_encoder.modules():
                if isinstance(m, torch.nn.LayerNorm):
                    m.weight.copy_(torch.exp(torch.randn(m.weight.shape, generator=gen) * 0.5))
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.3)
