"""Mixed precision on CPU: frozen weights in the training dtype, LoRA factors and learnable alphas in fp32."""

import math

import pytest
import torch

from sdlora.training.loop import train

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])  # both in one process: each train() picks its own precision
def test_lora_factors_and_learnable_alpha_stay_fp32_under_mixed_precision(make_config, tmp_path, precision):
    cfg = make_config(train={"max_steps": 3, "mixed_precision": precision}, output={"dir": str(tmp_path / precision)},
                      lora={"learnable_alpha": True, "init": "compensated"}, optim={"alpha_lr": 1e-2})
    result = train(cfg)
    assert all(math.isfinite(x) for x in result.losses) and len(result.losses) == 3
    for name, layer in result.layers.items():
        assert layer.alpha.dtype == torch.float32 and layer.lora_A.dtype == torch.float32, name
        assert layer.lora_B.dtype == torch.float32 and layer.base.weight.dtype == DTYPES[precision], name
    assert any(abs(float(layer.alpha) - cfg.lora.alpha) > 0 for layer in result.layers.values())  # alpha trained
    assert result.adapter_path.is_file()


@pytest.mark.parametrize("init, conv", [("compensated", False), ("principal", True)])
def test_offset_factors_stay_fp32_under_bf16_and_the_export_is_the_fp32_update(make_config, tmp_path, init, conv):
    """The exported update of an offset init is s·B·A - s0·B0·A0 with B0, A0 as initialised (fp32), not rounded
    through the bf16 the frozen weights are stored in."""
    from sdlora.adapter.io import load_adapter
    from sdlora.lora import inject_all
    from sdlora.model.loading import load_components

    cfg = make_config(train={"max_steps": 2, "mixed_precision": "bf16"}, output={"dir": str(tmp_path / "run")},
                      lora={"init": init, "conv": conv})
    result = train(cfg, log=lambda *_: None)
    comps = load_components(cfg.model.path)
    initial = inject_all(comps.adaptable(), cfg, comps.family)  # the same seeded init, never cast: B0, A0 in fp32
    exported = load_adapter(result.adapter_path).modules
    worst = 0.0
    for name, layer in result.layers.items():
        assert layer.offset_A.dtype == torch.float32 and layer.offset_B.dtype == torch.float32, name
        s = float(layer.scale())  # fixed alpha: s = s0
        # .cpu(): the comparison runs on the CPU whatever device trained (tests/test_gpu_training.py reuses this test)
        sb, a = s * layer.lora_B.detach().cpu().double().flatten(1), layer.lora_A.detach().cpu().double().flatten(1)
        b0, a0 = initial[name].offset_B.double().flatten(1), initial[name].offset_A.double().flatten(1)  # s0 in b0
        reference = sb @ a - b0 @ a0  # float64
        m = exported[name]
        got = m.up.double().flatten(1) @ m.down.double().flatten(1)
        # The export stores A, A0 and s0·B0 as they are (fp32) and rounds only s·B to fp32 (relative 2^-24 per
        # element), so |got - reference| <= 2^-24·|s·B|·|A| in exact arithmetic; float64 adds ~1e-16. Twice that
        # bound holds on any IEEE CPU. Not relative to |reference| alone: after two steps the update is a small
        # difference of two large terms, so its own norm says nothing about how exactly the terms were kept.
        # (Offsets rounded through bf16 err by ~2^-9·|s0·B0|·|A0|, 10^4 times more.)
        bound = 2 * 2.0 ** -24 * float(torch.linalg.norm(sb) * torch.linalg.norm(a)) + 1e-12
        err = float(torch.linalg.norm(got - reference))
        assert err <= bound, (name, err, bound)
        worst = max(worst, err / float(torch.linalg.norm(b0) * torch.linalg.norm(a0)))
    assert worst < 1e-6  # the scale of the offset term: fp32-exact, far below bf16's 4e-3
