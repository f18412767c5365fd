"""benchmarks/sdxl_memory.py's method: a training step traced with fake tensors counts the same bytes as with real
ones (the SDXL memory estimate in docs/sdxl-memory.md rests on it)."""

import importlib.util
from pathlib import Path

import pytest

from sdxl_fixtures import tiny_sdxl  # noqa: F401  (fixture)
from sdlora.model.tiny import TINY_SDXL_PROJECTION, TINY_SDXL_TE1, TINY_SDXL_TE2

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "sdxl_memory.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("sdxl_memory", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # about 30 s: fake tensors dispatch through Python
def test_fake_tensor_step_peak_equals_real_step_peak_byte_for_byte(tiny_sdxl):  # noqa: F811
    bench = load_benchmark()
    cfg = bench.sdxl_config(True, {"lora": {"rank": 4, "alpha": 4}})
    kw = {"widths": (TINY_SDXL_TE1, TINY_SDXL_TE2), "pooled": TINY_SDXL_PROJECTION, "steps": 1}
    real = bench.trace(tiny_sdxl, 64, cfg, fake=False, **kw)
    fake = bench.trace(tiny_sdxl, 64, cfg, fake=True, **kw)
    assert real["peak"]["activations"] > 0 and real["peak"]["optimiser state"] > 0  # the step did run and update
    assert fake["peak"] == real["peak"]  # every category, exactly (tolerance 0 bytes)
    assert fake["phase_peaks"] == real["phase_peaks"]  # forward and backward too: at 64 px the optimiser step peaks


@pytest.mark.slow  # about 30 s per precision: fake tensors dispatch through Python
@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_a_low_bit_base_is_traced_byte_for_byte_and_its_frozen_weights_shrink(tiny_sdxl, precision):  # noqa: F811
    """model.base_precision (docs/low-memory.md): the stored weights are counted (as parameters), fake = real."""
    pytest.importorskip("optimum.quanto")
    bench = load_benchmark()
    kw = {"widths": (TINY_SDXL_TE1, TINY_SDXL_TE2), "pooled": TINY_SDXL_PROJECTION, "steps": 1}
    cfg = bench.sdxl_config(True, {"lora": {"rank": 4, "alpha": 4}, "model": {"base_precision": precision}})
    full = bench.trace(tiny_sdxl, 64, bench.sdxl_config(True, {"lora": {"rank": 4, "alpha": 4}}), fake=False, **kw)
    real = bench.trace(tiny_sdxl, 64, cfg, fake=False, **kw)
    fake = bench.trace(tiny_sdxl, 64, cfg, fake=True, **kw)
    assert fake["peak"] == real["peak"] and fake["phase_peaks"] == real["phase_peaks"]  # tolerance 0 bytes
    # bf16 -> 1 byte for the Linear / Conv2d weights (most of the frozen bytes); VAE, norms and embeddings stay bf16
    # (and counted: untracked stored weights would leave about 0.1 of the full bytes)
    assert 0.4 * full["peak"]["parameters"] < real["peak"]["parameters"] < 0.8 * full["peak"]["parameters"]


@pytest.mark.slow  # about 20 s per case: fake tensors dispatch through Python
@pytest.mark.parametrize("mixed, precision", [("no", "full"), ("bf16", "fp8"), ("bf16", "int8")])
def test_the_sd1_step_is_traced_byte_for_byte_in_fp32_and_on_a_low_bit_base(tiny_model, mixed, precision):
    """benchmarks/memory_grid.py's SD 1.5 rows: one text encoder, the conditioning its hidden states, fp32 training
    without autocast or a stored base under bf16; fake = real to the byte."""
    if precision == "int8":
        pytest.importorskip("optimum.quanto")
    bench = load_benchmark()
    cfg = bench.sdxl_config(True, {"lora": {"rank": 4, "alpha": 4}, "train": {"mixed_precision": mixed},
                                   "model": {"base_precision": precision}},
                            path=BENCHMARK.parents[1] / "configs" / "sd15-character.yaml")
    from sdlora.model.loading import load_components

    kw = {"widths": (load_components(str(tiny_model)).text_encoder.config.hidden_size,), "steps": 2}
    real = bench.trace(tiny_model, 64, cfg, fake=False, **kw)
    fake = bench.trace(tiny_model, 64, cfg, fake=True, **kw)
    assert real["peak"]["activations"] > 0 and real["peak"]["optimiser state"] > 0
    assert fake["peak"] == real["peak"] and fake["phase_peaks"] == real["phase_peaks"]  # tolerance 0 bytes
