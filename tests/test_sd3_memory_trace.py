"""benchmarks/sd3_memory.py's SD3 step traced with fake tensors counts the same bytes as with real ones, on the tiny
SD3.5 Medium transformer (dual attention, QK-norm): the SD3.5 memory table rests on it."""

import importlib.util
from pathlib import Path

import pytest

from sdlora.model.tiny_sd3 import TINY_SD3_CLIP_G, TINY_SD3_CLIP_L, TINY_SD3_T5, tiny_sd3_transformer

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "sd3_memory.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("sd3_memory", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # about 20 s: fake tensors dispatch through Python
def test_fake_tensor_sd3_step_peak_equals_real_step_peak_byte_for_byte():
    bench = load_benchmark()
    config = dict(tiny_sd3_transformer("sd35m").config)
    kw = {"steps": 2, "joint_dim": TINY_SD3_T5, "pooled": TINY_SD3_CLIP_L + TINY_SD3_CLIP_G, "t5_tokens": 16}
    cfg = bench.sd3_config(True, rank=4)
    real = bench.trace(config, 64, cfg, fake=False, **kw)
    fake = bench.trace(config, 64, cfg, fake=True, **kw)
    assert real["peak"]["activations"] > 0 and real["peak"]["optimiser state"] > 0  # the step did run and update
    assert fake["peak"] == real["peak"] and fake["phase_peaks"] == real["phase_peaks"]  # to the byte
    # only the LoRA factors get gradients: the transformer is frozen (the trace once gave every weight a gradient)
    assert real["peak"]["gradients"] <= sum(n * size for n, size in real["trained"])
    # diffusers' default SD3 targets: 8 attention Linears in each of 3 blocks, less the last block's to_add_out, not
    # attn2 (peft's suffix match, as sdlora's: "attn.to_q" does not end "attn2.to_q"); lora_A and lora_B each
    assert len(real["trained"]) == 2 * (8 * 3 - 1)


@pytest.mark.slow  # about 20 s per case
@pytest.mark.parametrize("mixed, precision", [("no", "full"), ("bf16", "fp8"), ("bf16", "int8")])
def test_the_sd3_step_is_traced_byte_for_byte_in_fp32_and_on_a_low_bit_base(mixed, precision):
    """benchmarks/memory_grid.py's SD3.5 rows beside bf16: fp32 training, and a stored base (its weights counted as
    parameters); fake = real to the byte, and the stored base's frozen bytes are below the bf16 base's."""
    if precision == "int8":
        pytest.importorskip("optimum.quanto")
    bench = load_benchmark()
    config = dict(tiny_sd3_transformer("sd35m").config)
    kw = {"steps": 2, "joint_dim": TINY_SD3_T5, "pooled": TINY_SD3_CLIP_L + TINY_SD3_CLIP_G, "t5_tokens": 16}
    real = bench.trace(config, 64, bench.sd3_config(True, 4, precision, mixed), fake=False, **kw)
    fake = bench.trace(config, 64, bench.sd3_config(True, 4, precision, mixed), fake=True, **kw)
    assert real["peak"]["activations"] > 0 and real["peak"]["optimiser state"] > 0
    assert fake["peak"] == real["peak"] and fake["phase_peaks"] == real["phase_peaks"]  # tolerance 0 bytes
    if precision != "full":  # 1 byte per Linear weight (int8: + a scale per row) against bf16's 2
        bf16 = bench.trace(config, 64, bench.sd3_config(True, 4), fake=True, **kw)
        assert real["peak"]["parameters"] < 0.8 * bf16["peak"]["parameters"]
