"""Long captions (data.max_token_length): 75-token chunks, each with its own start/end tokens, encoded apart and
concatenated (AUTOMATIC1111's layout); 75 is today's tokenisation exactly."""

import math

import pytest
import torch

from sdlora.model.loading import load_components
from sdlora.model.text import content_mask, encode, tokenize
from sdlora.reg.probe import DriftProbe
from sdlora.training.loop import train
from sdlora.training.text_cache import TextEncoderOutputCache
from sdlora.model.families import SD1

FIRST = " ".join(["red", "cat"] * 37 + ["red"])  # 75 one-token words
SECOND = " ".join(["blue", "dog", "photo"] * 25)  # 75 more


@pytest.fixture(scope="module")
def comps(tiny_model):
    return load_components(str(tiny_model))


def test_the_test_captions_are_one_chunk_each(comps):
    tok = comps.tokenizer
    assert [len(tok(c, add_special_tokens=False).input_ids) for c in (FIRST, SECOND)] == [75, 75]


def test_a_150_token_caption_equals_the_reference_chunked_encoding(comps):
    te, tok = comps.text_encoder, comps.tokenizer
    ids = tokenize(tok, [FIRST + " " + SECOND, "a red cat"], 150)
    assert ids.shape == (2, 154)
    # Reference: each 75-token half tokenised on its own exactly as today (BOS, text, EOS, padding to 77) and
    # encoded in one batch of the same shape, then the outputs laid side by side.
    halves = tokenize(tok, [FIRST, SECOND, "a red cat", ""])
    assert torch.equal(ids, halves.reshape(2, 154))
    for clip_skip in (1, 2):
        with torch.no_grad():
            reference = encode(te, halves, clip_skip).reshape(2, 154, -1)
            got = encode(te, ids, clip_skip)
        assert torch.equal(got, reference)  # the same (4, 77) batch through the same kernels: bit-identical


def test_a_75_token_caption_is_unchanged_from_today(comps):
    tok = comps.tokenizer
    today = tok([FIRST, "a red cat", FIRST + " " + SECOND], padding="max_length", max_length=77, truncation=True,
                return_tensors="pt").input_ids
    assert torch.equal(tokenize(tok, [FIRST, "a red cat", FIRST + " " + SECOND], 75), today)
    assert torch.equal(tokenize(tok, [FIRST, "a red cat", FIRST + " " + SECOND]), today)


def test_225_cuts_at_225_tokens_into_three_chunks(comps):
    tok = comps.tokenizer
    ids = tokenize(tok, [" ".join([FIRST, SECOND, FIRST, SECOND])], 225)
    assert ids.shape == (1, 231)
    assert torch.equal(ids, tokenize(tok, [FIRST, SECOND, FIRST]).reshape(1, 231))


def test_content_mask_and_text_cache_and_probe_work_per_chunk(comps):
    te, tok = comps.text_encoder, comps.tokenizer
    ids = tokenize(tok, [FIRST + " " + SECOND, "a red cat"], 150)
    halves = tokenize(tok, [FIRST, SECOND, "a red cat", ""])
    assert torch.equal(content_mask(ids, tok.eos_token_id), content_mask(halves, tok.eos_token_id).reshape(2, 154))
    with torch.no_grad():
        assert torch.equal(TextEncoderOutputCache(te, family=SD1)(ids), encode(te, ids))
    probe = DriftProbe(te, tok, [FIRST + " " + SECOND], max_token_length=150, family=SD1, output="text_encoder")
    assert probe.input_ids.shape == (1, 154)
    stats = probe.measure()
    # Adapters absent: E == E0, so the drift is 0 and the cosine 1 (to fp32 rounding of a ratio of norms ~ 1).
    assert stats["probe/drift"] == 0.0 and math.isclose(stats["probe/cosine"], 1.0, rel_tol=1e-5)


def test_training_with_long_captions_penalty_and_probe(make_config, tmp_path):
    result = train(make_config(train={"max_steps": 2}, data={"max_token_length": 150, "prefix": FIRST + " "},
                               reg={"embedding_norm": {"weight": 0.1, "tokens": "content"}, "probe_every": 1}))
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)
    frozen = train(make_config(train={"max_steps": 2}, data={"max_token_length": 225}, text_encoder={"train": False},
                               output={"dir": str(tmp_path / "frozen")}))
    assert all(math.isfinite(x) for x in frozen.losses)


# ------------------------------------------------------------------------------- SDXL (issue 25, item 4)
from sdxl_fixtures import sdxl_config, tiny_sdxl  # noqa: E402,F401


def test_sdxl_long_captions_are_each_encoders_chunks_with_the_first_chunks_pooled_embedding(tiny_sdxl):
    from sdlora.model.families import sdxl_hidden_state

    comps = load_components(str(tiny_sdxl))
    te1, te2 = comps.text_encoders.values()
    captions = [FIRST + " " + SECOND, "a red cat"]
    ids = [tokenize(t, captions, 150) for t in comps.tokenizers]
    halves = [tokenize(t, [FIRST, SECOND, "a red cat", ""]) for t in comps.tokenizers]
    assert all(i.shape == (2, 154) and torch.equal(i, h.reshape(2, 154)) for i, h in zip(ids, halves))
    for clip_skip in (1, 2):
        with torch.no_grad():
            got = comps.family.encode([te1, te2], ids, clip_skip)
            # Reference: every chunk through each encoder as one 77-token caption, the hidden states laid side by
            # side (as for SD 1.x) and the pooled embedding of the first chunk (AUTOMATIC1111's and kohya's choice).
            out1 = te1(halves[0], output_hidden_states=True, return_dict=True)
            out2 = te2(halves[1], output_hidden_states=True, return_dict=True)
            h1 = sdxl_hidden_state(out1, clip_skip).reshape(2, 154, -1)
            h2 = sdxl_hidden_state(out2, clip_skip).reshape(2, 154, -1)
            pooled = out2.text_embeds.reshape(2, 2, -1)[:, 0]
        assert torch.equal(got.hidden, torch.cat([h1, h2], dim=-1)) and torch.equal(got.pooled, pooled)
        for name, want in (("text_encoder", h1), ("text_encoder_2", h2), ("pooled", pooled[:, None])):
            encoder = te1 if name == "text_encoder" else te2
            with torch.no_grad():
                alone = comps.family.encode_text_output(name, encoder, ids[0 if name == "text_encoder" else 1], clip_skip)
            assert torch.equal(comps.family.text_output(name, got), want) and torch.equal(alone, want), name


@pytest.mark.parametrize("length, te", [(150, True), (225, False)])
def test_sdxl_trains_and_samples_with_long_captions(sdxl_config, tmp_path, length, te):
    cfg = sdxl_config(train={"max_steps": 2}, data={"max_token_length": length, "prefix": FIRST + " "},
                      text_encoder={"train": te}, sample={"prompts": [SECOND], "every_steps": 2,
                                                          "num_inference_steps": 2},
                      reg={"embedding_norm": {"weight": 0.1 if te else 0.0, "tokens": "content"}, "probe_every": 1})
    result = train(cfg, log=lambda *a: None)
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)
    assert list((tmp_path / "run" / "samples").rglob("*.png"))
