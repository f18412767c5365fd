"""The text-encoder output cache's budget in bytes (data.text_cache_mb): SD3's conditioning is (77 + T5 length) x
joint_attention_dim per caption, 5.2 MiB in fp32 at T5's 256 tokens, so a count of captions alone would let 2048 of
them reach 10 GiB."""

import torch

from sdlora.config import validate
from sdlora.model.loading import load_components
from sdlora.model.text import tokenize
from sdlora.training.text_cache import DEFAULT_MAX_MB, TextEncoderOutputCache, make_text_cache

T5_LEN = 8
CAPTIONS = ["a red circle", "a blue square", "a green square", "a red square"]


def _config(model, data, tmp_path, **data_keys):
    return validate({"model": {"path": str(model)}, "data": {"path": str(data), "resolution": 64, **data_keys},
                     "output": {"dir": str(tmp_path / "run")}, "log": {"tracker": "none"},
                     "text_encoder": {"train": False, "t5_max_length": T5_LEN}})


def test_the_sd3_text_cache_holds_no_more_bytes_than_its_budget(tiny_sd35m, shapes_data, tmp_path):
    comps = load_components(str(tiny_sd35m))
    cfg = _config(tiny_sd35m, shapes_data, tmp_path)
    family = comps.family.for_run(comps, cfg)
    encoders = list(comps.text_encoders.values())
    width = comps.denoiser.config.joint_attention_dim
    pooled = comps.denoiser.config.pooled_projection_dim
    per_caption = ((77 + T5_LEN) * width + pooled) * 4  # fp32: hidden states and the pooled vector, counted by hand
    cache = TextEncoderOutputCache(encoders, family=family, max_bytes=int(2.5 * per_caption))
    ids = [tokenize(t, CAPTIONS, 75) for t in comps.tokenizers]
    with torch.no_grad():
        expected = family.encode(encoders, ids, 1)
    got = cache(ids)
    assert torch.equal(got.hidden, expected.hidden) and torch.equal(got.pooled, expected.pooled)
    assert len(cache.entries) == 2 and cache.nbytes == 2 * per_caption  # the two most recent captions fit
    again = cache([i[2:] for i in ids])  # held: no encoder pass
    assert cache.hits == 2 and torch.equal(again.hidden, expected.hidden[2:])
    cache([i[:1] for i in ids])  # a third caption: the least recently used one goes
    assert len(cache.entries) == 2 and cache.nbytes == 2 * per_caption <= cache.lru.max_bytes


def test_data_text_cache_mb_sets_the_budget(tiny_sd35m, shapes_data, tmp_path):
    default = make_text_cache(_config(tiny_sd35m, shapes_data, tmp_path), [], None)
    assert default.lru.max_bytes == DEFAULT_MAX_MB * 2**20 == 2 * 2**30
    small = make_text_cache(_config(tiny_sd35m, shapes_data, tmp_path, text_cache_mb=0.5), [], None)
    assert small.lru.max_bytes == 2**19
