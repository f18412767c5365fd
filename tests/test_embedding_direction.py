"""The direction term of reg.embedding_norm: weight · mean_t (1 − cos(E_t, E0_t)), on the batch's captions, pinned
prompts, or both; base embeddings cached like the norms."""

import pytest
import torch

from sdlora.errors import UserError
from sdlora.lora import inject_all
from sdlora.lora.layers import adapters_disabled
from sdlora.model.loading import load_components
from sdlora.model.text import content_mask, encode, tokenize
from sdlora.reg.embedding_norm import EmbeddingNormRegulariser
from sdlora.training.loop import train

CAPTIONS = ["a photo of a red circle", "a photo of a blue square, white background"]
PINNED = ["a dog", "a mountain lake at sunrise", "sks"]


def dense_direction(te, tok, captions, tokens, clip_skip=1):
    """Reference: per caption, per position, 1 − e·e0 / (‖e‖‖e0‖) in float64, averaged over the positions kept."""
    ids = tokenize(tok, captions)
    with torch.no_grad():
        e = encode(te, ids, clip_skip).double()
        with adapters_disabled(te):
            e0 = encode(te, ids, clip_skip).double()
    keep = content_mask(ids, tok.eos_token_id) if tokens == "content" else torch.ones_like(ids, dtype=torch.bool)
    per_caption = []
    for b in range(len(captions)):
        terms = [1.0 - float(e[b, t] @ e0[b, t]) / (float(e[b, t].norm()) * float(e0[b, t].norm()))
                 for t in range(ids.shape[1]) if keep[b, t]]
        per_caption.append(sum(terms) / len(terms))
    return sum(per_caption) / len(per_caption)


@pytest.mark.parametrize("prompts", ["batch", "pinned", "both"])
@pytest.mark.parametrize("tokens", ["all", "content"])
def test_direction_term_equals_a_dense_reference(make_config, prompts, tokens):
    cfg = make_config(reg={"embedding_norm": {"weight": 0.0, "direction_weight": 1.0, "direction_prompts": prompts,
                                              "pinned_prompts": PINNED, "tokens": tokens}})
    comps = load_components(cfg.model.path)
    layers = inject_all(comps.adaptable(), cfg, comps.family)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, layer in layers.items():
            if name.startswith("text_encoder."):
                layer.lora_B.add_(torch.randn(layer.lora_B.shape, generator=gen) * 0.3)
    te, tok = comps.text_encoder, comps.tokenizer
    reg = EmbeddingNormRegulariser(te, tok, cfg, family=comps.family, output="text_encoder")
    ids = tokenize(tok, CAPTIONS)
    got = reg(ids, encode(te, ids))
    parts = {"batch": [dense_direction(te, tok, CAPTIONS, tokens)], "pinned": [dense_direction(te, tok, PINNED, tokens)]}
    parts["both"] = parts["batch"] + parts["pinned"]
    reference = sum(parts[prompts]) / len(parts[prompts])
    assert reference > 1e-3  # the perturbation really turned the embeddings
    # fp32 cosines of 32-wide vectors err by ~1e-7 absolute; the term is ~1e-2 here.
    assert float(got.direction.detach()) == pytest.approx(reference, rel=1e-4, abs=1e-6)
    again = reg(ids, encode(te, ids))  # base embeddings come from the cache the second time
    assert torch.equal(again.direction, got.direction) and reg.cache.hits > 0
    got.direction.backward()  # differentiable: it trains the text-encoder adapters
    assert any(l.lora_B.grad is not None and float(l.lora_B.grad.abs().sum()) > 0
               for n, l in layers.items() if n.startswith("text_encoder."))


def test_direction_term_is_zero_for_the_base_model_and_logged_in_training(make_config, tmp_path):
    import json

    out = tmp_path / "run"
    train(make_config(output={"dir": str(out)}, train={"max_steps": 2},
                      reg={"embedding_norm": {"direction_weight": 0.5, "direction_prompts": "both",
                                              "pinned_prompts": PINNED}}), log=lambda *a: None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["embedding_norm/direction"] < 1e-6  # step 1 sees the untrained encoder: E == E0
    assert rows[1]["embedding_norm/direction"] > rows[0]["embedding_norm/direction"]


def test_pinned_prompts_are_required_for_pinned_direction(make_config):
    with pytest.raises(UserError, match="needs reg.embedding_norm.pinned_prompts"):
        make_config(reg={"embedding_norm": {"direction_weight": 1.0, "direction_prompts": "pinned"}})
