"""SDXL training options beyond conditioning: text-encoder output caching for both frozen encoders, and
lora.init_alphas_from an earlier SDXL run."""

import pytest
import torch
from safetensors.torch import load_file

from sdlora.lora import inject_all
from sdlora.model.families import SDXL
from sdlora.model.loading import load_components
from sdlora.model.text import tokenize
from sdlora.training.loop import train
from sdlora.training.text_cache import TextEncoderOutputCache
from sdxl_fixtures import sdxl_config, tiny_sdxl  # noqa: F401 (fixtures)

PROMPTS = ["a photo of a red circle", "sks person", "a photo of a red circle", "a green square"]


def test_the_text_cache_gives_both_encoders_conditioning_and_stays_bounded(tiny_sdxl):
    comps = load_components(str(tiny_sdxl))
    encoders = list(comps.text_encoders.values())
    for te in encoders:
        te.eval()
    ids = [tokenize(t, PROMPTS) for t in comps.tokenizers]  # a repeat inside the batch
    cache = TextEncoderOutputCache(encoders, clip_skip=2, capacity=2, family=SDXL)
    with torch.no_grad():
        expected = SDXL.encode(encoders, ids, clip_skip=2)
    got = cache(ids)
    # The same encoders on the same ids, batched differently: equal to fp32 rounding of O(1) activations.
    for a, b in [(got.hidden, expected.hidden), (got.pooled, expected.pooled),
                 *zip(got.per_encoder, expected.per_encoder)]:
        assert a.shape == b.shape and float((a - b).abs().max()) <= 1e-5
    assert (cache.misses, cache.hits) == (3, 1)
    assert len(cache.entries) == 2  # capacity: the least recently used caption dropped
    again = cache([i[3:] for i in ids])  # "a green square" is still held
    assert (cache.misses, cache.hits) == (3, 2)
    assert torch.equal(again.hidden, got.hidden[3:]) and torch.equal(again.pooled, got.pooled[3:])


def test_a_caption_is_keyed_by_both_encoders_ids(tiny_sdxl):
    comps = load_components(str(tiny_sdxl))
    encoders = list(comps.text_encoders.values())
    ids = [tokenize(t, PROMPTS[:1]) for t in comps.tokenizers]
    cache = TextEncoderOutputCache(encoders, family=SDXL)
    cache(ids)
    other = [ids[0], tokenize(comps.tokenizers[1], ["sks person"])]  # same first ids, different second ids
    cache(other)
    assert (cache.misses, cache.hits) == (2, 0)


def test_frozen_sdxl_encoders_use_the_cache_and_training_ends_with_the_same_adapter(sdxl_config, tmp_path):
    from transformers import CLIPTextModelWithProjection

    passes = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: passes.append(1) if isinstance(module, CLIPTextModelWithProjection) else None)
    adapters, counts = [], []
    try:
        for cached in (True, False):
            cfg = sdxl_config(text_encoder={"train": False}, data={"cache_text_encoder_outputs": cached},
                              train={"max_steps": 6}, output={"dir": str(tmp_path / f"run-{cached}")})
            passes.clear()
            adapters.append(load_file(train(cfg, log=lambda *a: None).adapter_path))
            counts.append(len(passes))
    finally:
        hook.remove()
    # 8 images with 8 distinct captions, batch 2: only the 4 batches of the first epoch reach the encoder (+4: the
    # drift probes of its tokens and of the pooled embedding, a base and a current pass each); uncached, all 6 steps.
    assert counts == [4 + 4, 6 + 4], counts
    with_cache, without = adapters
    assert with_cache.keys() == without.keys() and not any(k.startswith("text_encoder") for k in without)
    for k in with_cache:  # the same conditioning up to fp32 batching rounding, through six Adam steps
        assert float((with_cache[k] - without[k]).abs().max()) <= 1e-5 * (1 + float(without[k].abs().max())), k


def test_init_alphas_from_an_earlier_sdxl_run_covers_both_encoders(sdxl_config, tmp_path):
    first = train(sdxl_config(lora={"learnable_alpha": True, "alpha": 4, "init": "orthogonal"}, optim={"alpha_lr": 0.05}))
    learned = {n: float(layer.alpha) for n, layer in first.layers.items()}
    assert {n.split(".")[0] for n in learned} == {"unet", "text_encoder", "text_encoder_2"}
    assert max(abs(a - 4.0) for n, a in learned.items() if n.startswith("text_encoder_2.")) > 1e-3
    cfg = sdxl_config(lora={"learnable_alpha": True, "init_alphas_from": str(first.adapter_path)},
                      output={"dir": str(tmp_path / "second")})
    comps = load_components(cfg.model.path)
    layers = inject_all(comps.adaptable(), cfg, comps.family)
    assert set(layers) == set(learned)
    for n, layer in layers.items():
        assert float(layer.alpha) == pytest.approx(learned[n], abs=1e-6), n
