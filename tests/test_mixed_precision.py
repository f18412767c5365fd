"""Mixed precision on CPU: frozen weights in the training dtype, LoRA factors and learnable alphas in fp32."""

import math

import pytest
import torch

from sdlora.trainer import train

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
