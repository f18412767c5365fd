"""SDXL's embedding-norm penalty and drift probe: each text encoder's tokens held to that encoder's own base norms,
the pooled embedding's norm a third term, each with its own weight, cache and reported drift."""

import json

import pytest
import torch

from sdlora.errors import UserError
from sdlora.lora import inject_all
from sdlora.model.families import SDXL
from sdlora.model.loading import load_components
from sdlora.model.text import tokenize
from sdlora.reg.embedding_norm import TextRegulariser
from sdlora.reg.probe import family_probe
from sdlora.training.loop import train
from sdxl_fixtures import sdxl_config, tiny_sdxl  # noqa: F401 (fixtures)

CAPTIONS = ["a photo of a red circle", "a photo of a blue square, white background", "sks person"]
OUTPUTS = ("text_encoder", "text_encoder_2", "pooled")


def _adapted(sdxl_config, tiny_sdxl, **embedding_norm):
    cfg = sdxl_config(reg={"embedding_norm": {"weight": 1.0, **embedding_norm}})
    comps = load_components(str(tiny_sdxl))
    layers = inject_all(comps.adaptable(), cfg, comps.family)
    return cfg, comps, layers


def _perturb_text_encoders(layers, size=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, layer in layers.items():
            if name.startswith("text_encoder"):
                layer.lora_B.add_(torch.randn(layer.lora_B.shape, generator=gen) * size)


def _regulariser(comps, cfg):
    return TextRegulariser(comps.family, comps.text_encoders, dict(zip(comps.text_encoders, comps.tokenizers)), cfg)


def _ids(comps, captions=CAPTIONS):
    return [tokenize(t, captions) for t in comps.tokenizers]


@torch.no_grad()
def _dense_outputs(te1, te2, ids):
    """Each encoder's penultimate hidden states and encoder 2's pooled embedding, straight from transformers, float64."""
    out1 = te1(ids[0], output_hidden_states=True)
    out2 = te2(ids[1], output_hidden_states=True)
    return {"text_encoder": out1.hidden_states[-2].double(), "text_encoder_2": out2.hidden_states[-2].double(),
            "pooled": out2.text_embeds.double()}


def test_each_term_matches_a_dense_reference_and_the_loss_weighs_each_with_its_own_weight(sdxl_config, tiny_sdxl):
    cfg, comps, layers = _adapted(sdxl_config, tiny_sdxl, weight=0.7, text_encoder_2_weight=0.2, pooled_weight=0.05)
    _perturb_text_encoders(layers)
    reg = _regulariser(comps, cfg)
    ids = _ids(comps)
    with torch.no_grad():
        result = reg(ids, SDXL.encode([comps.text_encoder, comps.text_encoder_2], ids))
    # E0 from a separately loaded, never-adapted model: independent of how the regulariser disables its adapters.
    base = load_components(str(tiny_sdxl))
    live, e0 = _dense_outputs(comps.text_encoder, comps.text_encoder_2, ids), _dense_outputs(base.text_encoder,
                                                                                             base.text_encoder_2, ids)
    expected = {}
    for output in ("text_encoder", "text_encoder_2"):  # mean over captions of mean over all 77 tokens
        n, n0 = live[output].norm(dim=-1), e0[output].norm(dim=-1)
        expected[output] = float((n - n0).abs().mean(1).mean())
    expected["pooled"] = float((live["pooled"].norm(dim=-1) - e0["pooled"].norm(dim=-1)).abs().mean())
    assert set(result.terms) == set(OUTPUTS)
    for output in OUTPUTS:
        # fp32 sums of O(10) norms against a float64 reference: relative error ~1e-6, far inside 1e-4; the moved
        # encoders make each term O(0.1-1), so a term computed on the wrong tensor cannot pass.
        assert expected[output] > 1e-2, (output, expected)
        assert float(result.terms[output].penalty) == pytest.approx(expected[output], rel=1e-4), output
    loss = reg.add_to(torch.zeros(()), result)
    weighted = 0.7 * expected["text_encoder"] + 0.2 * expected["text_encoder_2"] + 0.05 * expected["pooled"]
    assert float(loss) == pytest.approx(weighted, rel=1e-4)


def test_each_encoder_has_its_own_base_norms_and_is_zero_at_the_start(sdxl_config, tiny_sdxl):
    cfg, comps, layers = _adapted(sdxl_config, tiny_sdxl, tokens="content")
    reg = _regulariser(comps, cfg)
    ids = _ids(comps)
    result = reg(ids, SDXL.encode([comps.text_encoder, comps.text_encoder_2], ids))
    for output in OUTPUTS:  # the adapters are a no-op at step 0: fp32 rounding only
        assert float(result.terms[output].penalty) <= 1e-5, output
    widths = {output: reg.parts[output][0].cache.norms(ids[reg.parts[output][1]]).shape for output in OUTPUTS}
    assert widths == {"text_encoder": (3, 77), "text_encoder_2": (3, 77), "pooled": (3, 1)}
    caches = [reg.parts[o][0].cache for o in OUTPUTS]
    assert len({id(c) for c in caches}) == 3 and all(c.misses == 3 for c in caches)
    # The content mask follows each encoder's own tokenizer: the second pads with "!", not end-of-text.
    mask1, mask2 = (reg.parts[o][0].mask(ids[i]) for i, o in enumerate(OUTPUTS[:2]))
    assert torch.equal(mask1, mask2) and 3 < int(mask1[0].sum()) < 77


def test_weights_default_from_the_first_encoders_and_a_zero_weight_drops_the_term(sdxl_config, tiny_sdxl):
    en = sdxl_config(reg={"embedding_norm": {"weight": 0.3}}).reg.embedding_norm
    assert [en.weight_of(o, SDXL) for o in OUTPUTS] == [0.3, 0.3, 0.3]
    en = sdxl_config(reg={"embedding_norm": {"weight": 0.3, "text_encoder_2_weight": 0.1}}).reg.embedding_norm
    assert [en.weight_of(o, SDXL) for o in OUTPUTS] == [0.3, 0.1, 0.1]
    cfg, comps, _ = _adapted(sdxl_config, tiny_sdxl, weight=0.0, text_encoder_2_weight=0.1, pooled_weight=0.0)
    assert list(_regulariser(comps, cfg).parts) == ["text_encoder_2"]


def test_drift_probe_reports_each_encoder_and_the_pooled_embedding(sdxl_config, tiny_sdxl):
    cfg, comps, layers = _adapted(sdxl_config, tiny_sdxl)
    probe = family_probe(comps.family, comps.text_encoders, dict(zip(comps.text_encoders, comps.tokenizers)))
    still = probe.measure()
    prefixes = ("probe/", "probe/text_encoder_2/", "probe/pooled/")
    assert all(p + k in still for p in prefixes for k in ("drift", "cosine", "norm", "base_norm"))
    for p in prefixes:
        assert still[p + "drift"] <= 1e-6 and still[p + "cosine"] >= 1 - 1e-6, p
    # Moving only the second encoder moves only its tokens and the pooled embedding.
    _perturb_text_encoders({n: l for n, l in layers.items() if n.startswith("text_encoder_2.")})
    moved = probe.measure()
    assert moved["probe/drift"] <= 1e-6
    assert moved["probe/text_encoder_2/drift"] > 1e-3 and moved["probe/pooled/drift"] > 1e-3, moved


def _run(sdxl_config, tmp_path, weight, name, steps=20):
    cfg = sdxl_config(train={"max_steps": steps, "batch_size": 2}, output={"dir": str(tmp_path / name)},
                      optim={"lr": 1e-3, "text_encoder_lr": 1e-2, "max_grad_norm": None},  # aggressive on purpose
                      reg={"embedding_norm": {"weight": weight}})
    result = train(cfg)
    probe = [json.loads(line) for line in (result.out_dir / "probe.jsonl").read_text().splitlines()][-1]
    metrics = [json.loads(line) for line in (result.out_dir / "metrics.jsonl").read_text().splitlines()]
    return probe, metrics


def test_with_an_aggressive_text_encoder_rate_the_penalty_keeps_each_encoders_drift_down(sdxl_config, tmp_path):
    off, _ = _run(sdxl_config, tmp_path, 0.0, "off")
    on, metrics = _run(sdxl_config, tmp_path, 0.1, "on")
    for p in ("probe/", "probe/text_encoder_2/", "probe/pooled/"):
        assert on[p + "drift"] * 5 < off[p + "drift"], (p, on, off)
    # Every step logs each term on its own.
    for p in ("embedding_norm/", "embedding_norm/text_encoder_2/", "embedding_norm/pooled/"):
        assert all({p + "penalty", p + "relative_drift", p + "cache_hits"} <= set(row) for row in metrics), p


def test_a_weight_map_per_text_output_is_the_older_keys_and_an_unknown_output_is_refused(sdxl_config, tiny_sdxl):
    """reg.embedding_norm.output_weights gives the weights text_encoder_2_weight / pooled_weight gave (a pooled
    embedding defaults to its encoder's tokens' weight); both forms of one key, or an output the family lacks, are
    one-line errors."""
    old = sdxl_config(reg={"embedding_norm": {"weight": 0.3, "text_encoder_2_weight": 0.1, "pooled_weight": 0.05}})
    new = sdxl_config(reg={"embedding_norm": {"weight": 0.3, "output_weights": {"text_encoder_2": 0.1, "pooled": 0.05}}})
    assert [old.reg.embedding_norm.weight_of(o, SDXL) for o in OUTPUTS] == [0.3, 0.1, 0.05]
    assert [new.reg.embedding_norm.weight_of(o, SDXL) for o in OUTPUTS] == [0.3, 0.1, 0.05]
    only_bigg = sdxl_config(reg={"embedding_norm": {"output_weights": {"text_encoder_2": 0.2}}}).reg.embedding_norm
    assert [only_bigg.weight_of(o, SDXL) for o in OUTPUTS] == [0.0, 0.2, 0.2]
    with pytest.raises(UserError, match="pooled_weight and reg.embedding_norm.output_weights.pooled are the same key"):
        sdxl_config(reg={"embedding_norm": {"pooled_weight": 0.1, "output_weights": {"pooled": 0.1}}})
    cfg, comps, _ = _adapted(sdxl_config, tiny_sdxl, output_weights={"text_encoder_3": 0.1})
    with pytest.raises(UserError, match=r"output_weights.text_encoder_3: SDXL has no text output 'text_encoder_3'"):
        _regulariser(comps, cfg)
