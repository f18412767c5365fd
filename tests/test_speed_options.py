"""Speed options change how the step is computed, never what it computes.

Gradient checkpointing and channels_last give the same loss and LoRA gradients as the plain step; the
text-encoder output cache gives the frozen encoder's exact outputs, stays bounded, and a run with it
ends with the same adapter as a run without it. On CPU the trainer keeps freed activation memory in the
process (sdlora/allocator.py) instead of faulting it in again every step.
"""

import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from outputs import PROMPTS
from sdlora.util.allocator import keep_freed_cpu_memory
from sdlora.lora import inject_all
from sdlora.model.loading import load_components
from sdlora.model.text import encode, tokenize
from sdlora.training.text_cache import TextEncoderOutputCache, make_text_cache
from sdlora.training.loop import train
from sdlora.training.placement import place_models
from sdlora.model.families import SD1

# fp32; recomputation, memory layout and thread count only reorder float sums. A reordered sum's error is about
# eps32 (6e-8) times the sum of the magnitudes of its terms, which is the scale of the gradients that do not
# cancel, not that of a gradient that cancels to float noise (orthogonal init: B·A = 0 leaves some mid-block
# gradients at ~1e-11, where two orders of summation differ by more than 100%). So every gradient is compared
# against the largest LoRA gradient of the step: measured worst 1.8e-6 of it across 1 vs 2 threads, 50x under.
REL_TOL = 1e-4
DEVICE = torch.device("cpu")  # tests/test_gpu_training.py runs these steps on its device


def loss_and_grads(make_config, threads=None, **train_opts):
    """Loss and LoRA gradients of one step; `threads` (default: this process's) changes the order of float sums
    the way another CPU would."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        return _loss_and_grads(make_config, **train_opts)
    finally:
        torch.set_num_threads(before)


def _loss_and_grads(make_config, **train_opts):
    cfg = make_config({"train": train_opts, "lora": {"init": "orthogonal"}})  # A and B both get gradient
    comps = load_components(cfg.model.path)
    layers = inject_all(comps.adaptable(), cfg, comps.family)
    place_models(comps, layers, DEVICE, torch.float32, cfg)
    gen = torch.Generator().manual_seed(0)
    emb = encode(comps.text_encoder, tokenize(comps.tokenizer, PROMPTS).to(DEVICE))
    latents = torch.randn(len(PROMPTS), 4, 8, 8, generator=gen).to(DEVICE)
    loss = comps.unet(latents, torch.tensor([10, 700], device=DEVICE), emb).sample.pow(2).mean()
    loss.backward()
    grads = {f"{n}.{p}": getattr(layer, p).grad.clone() for n, layer in layers.items() for p in ("lora_A", "lora_B")}
    return loss.detach(), grads


def assert_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert abs(float(loss_a - loss_b)) <= REL_TOL * abs(float(loss_a))
    assert grads_a.keys() == grads_b.keys() and any(name.startswith("text_encoder") for name in grads_a)
    scale = max(float(g.abs().max()) for g in grads_a.values())  # the step's largest LoRA gradient (see REL_TOL)
    assert scale > 0
    for name in grads_a:
        assert float((grads_a[name] - grads_b[name]).abs().max()) <= REL_TOL * scale, name


def test_gradient_checkpointing_gives_the_same_loss_and_lora_gradients(make_config):
    plain = loss_and_grads(make_config, threads=1)  # one thread: the sums' order of another CPU
    checkpointed = loss_and_grads(make_config, gradient_checkpointing=True)
    assert_same(plain, checkpointed)


def test_channels_last_gives_the_same_loss_and_lora_gradients(make_config):
    # One thread for the reference: the order of float sums another CPU would use (the clean-install failure).
    assert_same(loss_and_grads(make_config, threads=1), loss_and_grads(make_config, channels_last=True))


def test_gradient_checkpointing_is_switched_on_in_both_models(make_config):
    cfg = make_config({"train": {"gradient_checkpointing": True}})
    comps = load_components(cfg.model.path)
    layers = inject_all(comps.adaptable(), cfg, comps.family)
    place_models(comps, layers, torch.device("cpu"), torch.float32, cfg)
    te = comps.text_encoder  # transformers 5's name (the old one warns), else transformers 4's
    te_on = te.is_activation_checkpointing if hasattr(type(te), "is_activation_checkpointing") else te.is_gradient_checkpointing
    assert comps.unet.is_gradient_checkpointing and te_on


def test_text_cache_returns_the_encoders_outputs_and_stays_bounded(tiny_model):
    comps = load_components(str(tiny_model))
    comps.text_encoder.eval()
    ids = tokenize(comps.tokenizer, PROMPTS + [PROMPTS[0], "a green square"])  # a repeat inside the batch
    cache = TextEncoderOutputCache(comps.text_encoder, clip_skip=2, capacity=2, family=comps.family)
    with torch.no_grad():
        expected = encode(comps.text_encoder, ids, clip_skip=2)
    got = cache(ids)
    assert float((got - expected).abs().max()) <= 1e-5
    assert (cache.misses, cache.hits) == (3, 1)
    assert len(cache.entries) == 2  # capacity: least recently used dropped
    again = cache(ids[3:])  # "a green square" is still held
    assert (cache.misses, cache.hits) == (3, 2) and torch.equal(again, got[3:])


def test_text_cache_is_used_only_for_a_frozen_encoder_with_the_option_on(make_config):
    assert make_text_cache(make_config(), None, SD1) is None  # text encoder trained by default
    assert make_text_cache(make_config({"text_encoder": {"train": False}, "data": {"cache_text_encoder_outputs": False}}), None, SD1) is None
    assert make_text_cache(make_config({"text_encoder": {"train": False}}), object(), SD1) is not None


def test_training_with_the_text_cache_ends_with_the_same_adapter(make_config, tmp_path):
    adapters = []
    for cached in (True, False):
        cfg = make_config({"text_encoder": {"train": False}, "data": {"cache_text_encoder_outputs": cached},
                           "train": {"max_steps": 3}, "output": {"dir": str(tmp_path / f"run-{cached}")}})
        adapters.append(load_file(train(cfg, log=lambda *a: None).adapter_path))
    with_cache, without = adapters
    assert with_cache.keys() == without.keys()
    for k in with_cache:
        assert float((with_cache[k] - without[k]).abs().max()) <= 1e-5 * (1 + float(without[k].abs().max())), k


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_cpu_training_keeps_freed_activation_memory_for_the_next_step():
    """After keep_freed_cpu_memory() a freed 256 MiB block stays resident, for the next step's activations.

    (Whether glibc then serves the next request from that memory depends on the heap's layout; the training
    benchmark's page-fault count shows that it does in practice: docs/benchmarks.md.)"""
    assert keep_freed_cpu_memory()
    block = torch.ones(64 << 20)  # 256 MiB, every page touched
    holding = rss_bytes()
    del block
    assert holding - rss_bytes() <= 16 << 20  # glibc's defaults hand all 256 MiB back here
