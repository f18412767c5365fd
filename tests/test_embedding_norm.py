"""The embedding-norm penalty and the drift probe, on the tiny model (whose layer norms are non-trivial)."""

import json

import pytest
import torch
from transformers import CLIPTextModel

from sdlora.reg.embedding_norm import BaseNormCache, EmbeddingNormRegulariser, base_embeddings, embedding_norm_penalty, token_norms
from sdlora.lora import inject_all
from sdlora.model.loading import load_components
from sdlora.reg.probe import DriftProbe
from sdlora.model.text import content_mask, encode, tokenize
from sdlora.training.loop import train

CAPTIONS = ["a photo of a red circle", "a photo of a blue square, white background", "sks person"]


def _adapted(make_config, **lora):
    cfg = make_config(lora={"rank": 4, "alpha": 4, **lora}, reg={"embedding_norm": {"weight": 1.0}})
    comps = load_components(cfg.model.path)
    layers = inject_all(comps.adaptable(), cfg, comps.family)
    return cfg, comps, layers


def _perturb_text_encoder(layers, size=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, layer in layers.items():
            if name.startswith("text_encoder."):
                layer.lora_B.add_(torch.randn(layer.lora_B.shape, generator=gen) * size)


def test_tiny_text_encoder_output_norms_vary_across_tokens(tiny_model):
    # With layer-norm parameters (1, 0) every token would have norm sqrt(hidden) exactly and the penalty could not act.
    comps = load_components(str(tiny_model))
    ids = tokenize(comps.tokenizer, CAPTIONS)
    norms = token_norms(encode(comps.text_encoder, ids).detach())
    hidden = comps.text_encoder.config.hidden_size
    assert float(norms.std()) > 0.05 * float(norms.mean()), norms
    assert float((norms - hidden ** 0.5).abs().max()) > 0.5


def test_penalty_matches_a_dense_reference_for_every_option():
    gen = torch.Generator().manual_seed(0)
    e = torch.randn(2, 6, 5, generator=gen)
    e0 = torch.randn(2, 6, 5, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    for norm, order in (("l2", 2), ("l1", 1)):
        n = [[float(torch.linalg.vector_norm(e[b, t].double(), ord=order)) for t in range(6)] for b in range(2)]
        n0 = [[float(torch.linalg.vector_norm(e0[b, t].double(), ord=order)) for t in range(6)] for b in range(2)]
        rows = [[t for t in range(6) if mask[b, t]] for b in range(2)]
        per_token = sum(sum(abs(n[b][t] - n0[b][t]) for t in rows[b]) / len(rows[b]) for b in range(2)) / 2
        mean = sum(abs(sum(n[b][t] for t in rows[b]) / len(rows[b]) - sum(n0[b][t] for t in rows[b]) / len(rows[b]))
                   for b in range(2)) / 2
        base = token_norms(e0, norm)
        got_pt = embedding_norm_penalty(e, base, mask, norm=norm, reduce="per_token").penalty
        got_mean = embedding_norm_penalty(e, base, mask, norm=norm, reduce="mean").penalty
        assert float(got_pt) == pytest.approx(per_token, rel=1e-5), norm
        assert float(got_mean) == pytest.approx(mean, rel=1e-5), norm


def test_content_tokens_run_up_to_and_including_the_end_of_text_token(tiny_model):
    comps = load_components(str(tiny_model))
    ids = tokenize(comps.tokenizer, ["a cat", "a photo of the red dog"])
    mask = content_mask(ids, comps.tokenizer.eos_token_id)
    for row, m in zip(ids, mask):
        eos = int((row == comps.tokenizer.eos_token_id).nonzero()[0])
        assert m[: eos + 1].all() and not m[eos + 1:].any()


@pytest.mark.parametrize("init", ["zero", "orthogonal", "compensated", "principal"])
def test_penalty_is_zero_at_step0_and_positive_once_the_text_encoder_moved(make_config, init):
    cfg, comps, layers = _adapted(make_config, init=init)
    reg = EmbeddingNormRegulariser(comps.text_encoder, comps.tokenizer, cfg, family=comps.family, output="text_encoder")
    ids = tokenize(comps.tokenizer, CAPTIONS)
    at_start = reg(ids, encode(comps.text_encoder, ids)).penalty.detach()
    assert float(at_start) <= 1e-5, float(at_start)  # fp32 rounding only: the adapters are a no-op at step 0
    _perturb_text_encoder(layers)
    moved = reg(ids, encode(comps.text_encoder, ids))
    assert float(moved.penalty) > 1e-2 and float(moved.relative_drift) > 1e-3, moved


def test_penalty_gradient_reaches_text_encoder_lora_and_not_the_unet(make_config):
    cfg, comps, layers = _adapted(make_config)
    _perturb_text_encoder(layers)  # |x| has no gradient at 0: move off the start first
    reg = EmbeddingNormRegulariser(comps.text_encoder, comps.tokenizer, cfg, family=comps.family, output="text_encoder")
    ids = tokenize(comps.tokenizer, CAPTIONS)
    emb = encode(comps.text_encoder, ids)
    comps.unet(torch.randn(len(CAPTIONS), 4, 8, 8), torch.tensor([10, 500, 900]), emb)  # the UNet is in the graph too
    reg(ids, emb).penalty.backward()
    for name, layer in layers.items():
        grads = [layer.lora_A.grad, layer.lora_B.grad]
        if name.startswith("text_encoder."):
            assert all(g is not None for g in grads), name
        else:
            assert all(g is None or float(g.abs().max()) == 0.0 for g in grads), name
    te_grad = sum(float(l.lora_B.grad.abs().sum()) for n, l in layers.items() if n.startswith("text_encoder."))
    assert te_grad > 0


def test_penalty_alone_brings_the_drift_back_down(make_config):
    cfg, comps, layers = _adapted(make_config)
    _perturb_text_encoder(layers, size=0.5)
    reg = EmbeddingNormRegulariser(comps.text_encoder, comps.tokenizer, cfg, family=comps.family, output="text_encoder")
    ids = tokenize(comps.tokenizer, CAPTIONS)
    params = [p for n, l in layers.items() if n.startswith("text_encoder.") for p in (l.lora_A, l.lora_B)]
    opt = torch.optim.Adam(params, lr=1e-2)
    drift = []
    for _ in range(30):
        result = reg(ids, encode(comps.text_encoder, ids))
        drift.append(float(result.relative_drift))
        opt.zero_grad()
        result.penalty.backward()
        opt.step()
    assert drift[0] > 0.05, drift[0]
    assert drift[-1] < 0.3 * drift[0], (drift[0], drift[-1])


def _run(make_config, tmp_path, weight, name, steps=40):
    cfg = make_config(train={"max_steps": steps, "batch_size": 4}, lora={"rank": 4, "alpha": 4},
                      optim={"lr": 1e-3, "text_encoder_lr": 1e-2},  # aggressive on purpose: the text encoder drifts
                      reg={"embedding_norm": {"weight": weight}}, output={"dir": str(tmp_path / name)})
    result = train(cfg)
    probe = [json.loads(line) for line in (result.out_dir / "probe.jsonl").read_text().splitlines()][-1]
    return result, probe


def test_with_an_aggressive_text_encoder_rate_the_penalty_keeps_probe_drift_down(make_config, tmp_path):
    _, off = _run(make_config, tmp_path, 0.0, "off")
    _, on = _run(make_config, tmp_path, 0.1, "on")
    # Measured on the tiny model (docs/embedding-norm.md): drift 0.58 off vs 0.011 on; assert a conservative factor.
    assert on["probe/drift"] * 5 < off["probe/drift"], (on, off)
    assert on["probe/cosine"] > off["probe/cosine"], (on, off)


def test_every_step_logs_the_penalty_terms(make_config, tmp_path):
    result, _ = _run(make_config, tmp_path, 0.1, "logged", steps=5)
    rows = [json.loads(line) for line in (result.out_dir / "metrics.jsonl").read_text().splitlines()]
    keys = {"diffusion_loss", "embedding_norm/penalty", "embedding_norm/mean_norm", "embedding_norm/mean_base_norm",
            "embedding_norm/relative_drift", "embedding_norm/cache_hits"}
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(keys <= set(r) for r in rows)


def test_cached_base_norms_equal_uncached_and_the_cache_is_bounded(make_config):
    cfg, comps, layers = _adapted(make_config)
    _perturb_text_encoder(layers)  # the base norms must come from W0 even while the adapters are active
    ids = tokenize(comps.tokenizer, CAPTIONS)
    cache = BaseNormCache(comps.text_encoder, clip_skip=1, norm="l2", capacity=2)
    first = cache.norms(ids[:2])
    second = cache.norms(ids[:2])
    direct = token_norms(base_embeddings(comps.text_encoder, ids[:2], clip_skip=1))
    assert torch.equal(first, second) and float((first - direct).abs().max()) <= 1e-6
    assert (cache.hits, cache.misses) == (2, 2)
    cache.norms(ids[2:])
    assert len(cache.entries) == 2  # capacity 2: the least recently used sequence was dropped


def test_clip_skip_base_norms_use_the_skipped_layer(make_config):
    cfg, comps, _ = _adapted(make_config)
    ids = tokenize(comps.tokenizer, CAPTIONS)
    skip1 = BaseNormCache(comps.text_encoder, clip_skip=1, norm="l2", capacity=8).norms(ids)
    skip2 = BaseNormCache(comps.text_encoder, clip_skip=2, norm="l2", capacity=8).norms(ids)
    assert float((skip1 - skip2).abs().max()) > 1e-3


class _CountTextEncoderPasses:
    def __enter__(self):
        self.count = 0

        def hook(module, args, output):
            if isinstance(module, CLIPTextModel):
                self.count += 1

        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_weight_zero_adds_no_text_encoder_pass_and_cache_hits_add_none_either(make_config, tmp_path):
    steps, probe_passes = 10, 2  # the probe runs once at the end: base embeddings + current embeddings
    with _CountTextEncoderPasses() as off:
        _run(make_config, tmp_path, 0.0, "w0", steps=steps)
    assert off.count == steps + probe_passes
    with _CountTextEncoderPasses() as on:
        _run(make_config, tmp_path, 0.1, "w1", steps=steps)
    # 8 images with 8 distinct captions, batch 4: only the two batches of the first epoch miss the cache.
    assert on.count == steps + probe_passes + 2


def test_drift_probe_reports_no_drift_for_the_base_model_and_some_after_a_change(make_config):
    cfg, comps, layers = _adapted(make_config)
    probe = DriftProbe(comps.text_encoder, comps.tokenizer, family=comps.family, output="text_encoder")
    still = probe.measure()
    assert still["probe/drift"] <= 1e-6 and still["probe/cosine"] >= 1 - 1e-6
    _perturb_text_encoder(layers)
    moved = probe.measure()
    assert moved["probe/drift"] > 1e-3 and moved["probe/cosine"] < 1 - 1e-4


def test_a_caption_repeated_in_a_batch_is_encoded_once(make_config):
    """The base-norm cache shares the text cache's LRU (util/lru.py): a caption twice in one batch costs one base
    pass and one miss (it once encoded each copy and counted two misses)."""
    cfg, comps, _ = _adapted(make_config)
    ids = tokenize(comps.tokenizer, [CAPTIONS[0], CAPTIONS[1], CAPTIONS[0]])
    cache = BaseNormCache(comps.text_encoder, clip_skip=1, norm="l2", capacity=8)
    rows = []
    hook = comps.text_encoder.register_forward_hook(
        lambda m, args, kwargs, out: rows.append((args[0] if args else kwargs["input_ids"]).shape[0]), with_kwargs=True)
    try:
        norms = cache.norms(ids)
    finally:
        hook.remove()
    assert rows == [2] and (cache.misses, cache.hits) == (2, 1) and len(cache.entries) == 2
    assert torch.equal(norms[0], norms[2])
