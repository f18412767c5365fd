"""Issue 27, "the penalty at least halves the CLIP encoders' drift on prompts the training never saw": the tiny
SD3.5 Medium trained with both CLIP encoders at an aggressive text-encoder rate, penalty off and on; the drift probe
(its everyday prompts, which the shapes captions never contain) on each CLIP's tokens and each CLIP's half of the
pooled vector. benchmarks/embedding_norm.py --family sd3 measures it over more steps and seeds
(docs/embedding-norm.md)."""

import json

from sdlora.config import validate
from sdlora.training.loop import train

OUTPUTS = ("probe/", "probe/text_encoder_2/", "probe/pooled_l/", "probe/pooled/")  # CLIP-L, CLIP-G, pooled halves


def _final_probe(model, data, root, weight):
    cfg = validate({"model": {"path": str(model)}, "data": {"path": str(data), "resolution": 64},
                    "output": {"dir": str(root / f"w{weight}")}, "train": {"max_steps": 20, "batch_size": 4, "seed": 0},
                    "optim": {"lr": 1e-3, "text_encoder_lr": 1e-2, "max_grad_norm": None},
                    "lora": {"rank": 8, "alpha": 8}, "log": {"tracker": "none"},
                    "text_encoder": {"train": True, "t5_max_length": 8},
                    "reg": {"embedding_norm": {"weight": weight}}})
    result = train(cfg, log=lambda *a, **k: None)
    return json.loads((result.out_dir / "probe.jsonl").read_text().splitlines()[-1])


def test_the_penalty_at_least_halves_each_clips_drift_on_held_out_prompts(tiny_sd35m, shapes_data, tmp_path):
    """Measured at these settings (20 steps of batch 4, weight 0.1; x86_64, 1 thread): the drift falls 210x (CLIP-L's
    tokens), 100x (CLIP-G's), 6.7x (pooled CLIP-L) and 11.6x (pooled CLIP-G); asserting 2x (the issue's claim) leaves
    a margin of 3x or more for other CPUs' rounding. (At 12 steps of batch 2 pooled CLIP-L had barely moved without
    the penalty, 0.09, and fell only 2.8x: too close to the claim to be a robust check.)"""
    off = _final_probe(tiny_sd35m, shapes_data, tmp_path, 0.0)
    on = _final_probe(tiny_sd35m, shapes_data, tmp_path, 0.1)
    for p in OUTPUTS:
        assert off[p + "drift"] > 0.05, (p, off)  # the aggressive rate moved the encoder: something to halve
        assert on[p + "drift"] * 2 <= off[p + "drift"], (p, on[p + "drift"], off[p + "drift"])
