"""The paths only a GPU takes, checked on the tiny SD 1.x and SDXL models: CUDA autocast in bf16 and fp16 (with the
gradient scaler), fused and 8-bit AdamW, gradient checkpointing, `train.compile`, `train.ema.device: cpu`, resume
after a kill, and the exports equal to the fp32 update.

Marked `gpu`: they skip without CUDA (tests/gpu_device.py; `SDLORA_TEST_DEVICE=cpu` runs them on the CPU). Where a
CPU test already states the property, it is reused as it is, run on the device (the spy in gpu_device.py proves
where every run trained); the rest are new here because the CPU never takes that path.
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import sdlora.training.loop as loop
import sdlora.training.setup as setup
import test_checkpoint
import test_ema
import test_export_precision
import test_mixed_precision
import test_reliability
import test_speed_options
from conftest import deep_update
from gpu_device import DEVICE, MARKS, _record_placements, placed, spy  # noqa: F401 (fixtures)
from sdxl_fixtures import sdxl_config, tiny_sdxl  # noqa: F401 (fixtures)
from test_checkpoint import uninterrupted  # noqa: F401 (fixture)
from test_export_precision import rank32_alpha1  # noqa: F401 (fixture)
from test_reliability import reference  # noqa: F401 (fixture)

pytestmark = MARKS
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def quiet(*a, **k):
    pass


# ------------------------------------------------------------------------------------ mixed precision
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_sd1_mixed_precision_keeps_adapters_fp32(make_config, tmp_path, precision, placed):
    test_mixed_precision.test_lora_factors_and_learnable_alpha_stay_fp32_under_mixed_precision(make_config, tmp_path,
                                                                                               precision)
    placed()


@pytest.mark.parametrize("precision, checkpointing", [("bf16", False), ("fp16", False), ("bf16", True)])
def test_sdxl_trains_under_mixed_precision(sdxl_config, tmp_path, precision, checkpointing, placed):  # noqa: F811
    cfg = sdxl_config(train={"max_steps": 3, "mixed_precision": precision, "gradient_checkpointing": checkpointing})
    result = loop.train(cfg, log=quiet)
    placed()
    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses), result.losses
    assert {n.split(".")[0] for n in result.layers} >= {"unet", "text_encoder", "text_encoder_2"}
    for name, layer in result.layers.items():
        assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32, name
        assert layer.base.weight.dtype == DTYPES[precision], name
    assert result.components.unet.is_gradient_checkpointing == checkpointing
    assert all(torch.isfinite(t).all() for t in load_file(result.adapter_path).values())


def test_fp16_loss_scaling_skips_an_overflowing_step_and_the_run_goes_on(make_config, tmp_path, placed):
    """Step 3's loss is multiplied by 1e30: finite in fp32, but its gradients overflow fp16. On CUDA the gradient
    scaler finds the inf, makes no update and lowers its scale (not a non-finite step for sdlora's guard); on the CPU
    (no scaler) the guard skips the step as non-finite gradients. Either way step 3 changes nothing and the run
    trains on."""
    out = tmp_path / "run"
    cfg = make_config(output={"dir": str(out)}, train={"max_steps": 6, "mixed_precision": "fp16"},
                      checkpoint={"every_steps": 1, "keep_last": 10})
    result = loop.train(cfg, fault_hook=lambda step, loss: loss * 1e30 if step == 3 else loss, log=quiet)
    placed()
    state = {s: load_file(out / "checkpoints" / f"step_{s:06d}" / "lora_state.safetensors") for s in (2, 3, 6)}
    assert all(torch.equal(state[2][k], state[3][k]) for k in state[2])  # step 3 made no update
    assert any(not torch.equal(state[3][k], state[6][k]) for k in state[3])  # later steps trained
    assert result.step == 6 and json.loads((out / "run.json").read_text())["status"] == "finished"
    skipped = [json.loads(line)["nonfinite_steps"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert skipped == ([0] * 6 if DEVICE == "cuda" else [0, 0, 1, 1, 1, 1]), skipped


# --------------------------------------------------------------------------------------------- optimisers
def test_adamw_is_fused_on_cuda_and_computes_what_foreach_computes(make_config, tmp_path, monkeypatch, placed):
    made = spy(monkeypatch, setup, "make_optimizer")
    result = loop.train(make_config(output={"dir": str(tmp_path / "run")}, train={"max_steps": 2}), log=quiet)
    placed()
    assert made[0].defaults.get("fused") is (True if DEVICE == "cuda" else None), made[0].defaults
    # The same three updates from the same gradients by torch's foreach AdamW: the fused kernel only reorders fp32
    # arithmetic (a few ulps of each update, lr 1e-3 x 2^-23 ~ 1e-10); 1e-6 x lr per step is 10^3 times that.
    params = [p.detach().clone().requires_grad_(True) for layer in result.layers.values()
              for p in (layer.lora_A, layer.lora_B)]
    twins = [p.detach().clone().requires_grad_(True) for p in params]
    gen = torch.Generator(device=params[0].device).manual_seed(0)
    fused = setup.make_optimizer([{"params": params, "name": "all"}], make_config())
    foreach = torch.optim.AdamW([{"params": twins}], **{k: fused.defaults[k] for k in ("lr", "betas", "eps",
                                                                                       "weight_decay")}, foreach=True)
    for _ in range(3):
        for p, q in zip(params, twins):
            p.grad = torch.randn(p.shape, generator=gen, device=p.device)
            q.grad = p.grad.clone()
        fused.step()
        foreach.step()
    lr = fused.defaults["lr"]
    assert max(float((p - q).abs().max()) for p, q in zip(params, twins)) <= 3 * 1e-6 * lr


def test_adamw8bit_trains_with_8bit_state(make_config, tmp_path, monkeypatch, placed):
    bnb = pytest.importorskip("bitsandbytes", reason="the bnb extra is not installed")
    # The tiny model's factors are under bitsandbytes' min_8bit_size (4096 values), which keeps fp32 moments; 16 gives
    # them the 8-bit state that SD's factors get (rank 16 x 320 = 5120 values and up).
    eight_bit = bnb.optim.AdamW8bit
    monkeypatch.setattr(bnb.optim, "AdamW8bit", lambda *a, **k: eight_bit(*a, **k, min_8bit_size=16))
    made = spy(monkeypatch, setup, "make_optimizer")
    out = tmp_path / "run"
    result = loop.train(make_config(output={"dir": str(out)}, train={"max_steps": 3}, optim={"optimizer": "adamw8bit"},
                                    lora={"init": "orthogonal"}), log=quiet)
    placed()
    assert type(made[0]).__module__.startswith("bitsandbytes"), type(made[0])
    assert made[0].state
    for p, state in made[0].state.items():  # 8-bit moments for the factors; the alphas (1 value) keep fp32 ones
        assert state["state1"].dtype == (torch.uint8 if p.numel() >= 16 else torch.float32), p.shape
    assert all(math.isfinite(x) for x in result.losses) and len(result.losses) == 3
    adapter = load_file(result.adapter_path)
    assert all(torch.isfinite(t).all() for t in adapter.values()) and any(t.abs().max() > 0 for t in adapter.values())


# ---------------------------------------------------------------------------------------- speed options
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(make_config, monkeypatch):
    monkeypatch.setattr(test_speed_options, "DEVICE", torch.device(DEVICE))
    real, devices = test_speed_options.place_models, []

    def recording(comps, layers, device, *args):
        devices.append(device.type)
        return real(comps, layers, device, *args)

    monkeypatch.setattr(test_speed_options, "place_models", recording)
    test_speed_options.test_gradient_checkpointing_gives_the_same_loss_and_lora_gradients(make_config)
    assert devices == [DEVICE, DEVICE]  # the plain and the checkpointed step


def test_compile_trains_and_its_first_loss_is_the_eager_one(make_config, tmp_path, monkeypatch, placed):
    if DEVICE == "cpu":  # inductor's C++ kernels take over 10 minutes to build on 2 shared cores; aot_eager traces the
        # same graphs (dynamo, the LoRA layers, autograd) without generating code: the plumbing, not the kernels
        compile_eager = torch.nn.Module.compile
        monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_eager(self, backend="aot_eager"))
    runs = {c: loop.train(make_config(output={"dir": str(tmp_path / str(c))}, train={"max_steps": 2, "compile": c}),
                          log=quiet) for c in (False, True)}
    placed()
    assert runs[True].components.unet._compiled_call_impl is not None  # nn.Module.compile took effect
    eager, compiled = runs[False].losses, runs[True].losses
    # Step 1 sees the same weights and batch; the compiled graph only fuses and reorders fp32 arithmetic (relative
    # ~1e-6 of a loss of about 1); 1e-4 allows for TF32 convolutions being chosen differently on CUDA.
    assert abs(eager[0] - compiled[0]) <= 1e-4 * abs(eager[0]), (eager, compiled)
    assert all(math.isfinite(x) for x in compiled) and len(compiled) == 2


# ------------------------------------------------------------------------------------------------- EMA
def ema_on_cpu(make_config):
    return lambda extra=None, **kw: make_config(deep_update(extra or {}, {"train": {"ema": {"device": "cpu"}}}), **kw)


def test_ema_on_the_cpu_equals_the_reference_recursion(make_config, tmp_path, monkeypatch, placed):
    made = spy(monkeypatch, setup, "make_ema")
    test_ema.test_ema_equals_the_reference_recursion_over_the_checkpointed_weights(ema_on_cpu(make_config), tmp_path)
    placed()
    assert made and all(t.device.type == "cpu" for t in made[0].shadow.values())


def test_ema_on_the_cpu_survives_kill_and_resume_bit_identically(make_config, tmp_path, monkeypatch, placed):
    made = spy(monkeypatch, setup, "make_ema")
    test_ema.test_ema_survives_kill_and_resume_bit_identically(ema_on_cpu(make_config), tmp_path)
    placed()
    assert len(made) == 3 and all(t.device.type == "cpu" for e in made for t in e.shadow.values())


# ------------------------------------------------------------------------------------------------ resume
def assert_bit_identical(a: dict, b: dict) -> None:
    """After the reused test's 1e-6 check: the resumed run replays the same kernels on the same inputs, so its adapter
    is the uninterrupted run's bit for bit, unless a kernel is nondeterministic (atomics in some CUDA backward
    passes; torch.use_deterministic_algorithms would say which)."""
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"within 1e-6 but not bit-identical ({len(differ)} of {len(a)} tensors): {differ[:3]}"


def test_a_run_killed_with_sigkill_then_resumed_equals_the_uninterrupted_run(tiny_model, shapes_data, tmp_path,
                                                                            reference, placed):  # noqa: F811
    test_reliability.test_a_run_killed_with_sigkill_then_resumed_equals_the_uninterrupted_run(
        1, tiny_model, shapes_data, tmp_path, reference)  # within 1e-6
    placed()
    assert_bit_identical(load_file(tmp_path / "run" / "adapter.safetensors"), reference)


def test_interrupted_and_resumed_run_equals_the_uninterrupted_run(make_config, tmp_path, uninterrupted,  # noqa: F811
                                                                  placed):
    test_checkpoint.test_interrupted_and_resumed_run_equals_the_uninterrupted_run(make_config, tmp_path, uninterrupted)
    placed()
    assert_bit_identical(*(load_file(d / "adapter.safetensors") for d in (tmp_path / "run", uninterrupted)))


# ------------------------------------------------------------------------------------------------ exports
@pytest.mark.parametrize("init, conv", [("compensated", False), ("principal", True)])
def test_bf16_offset_exports_are_the_fp32_update(make_config, tmp_path, init, conv, placed):
    test_mixed_precision.test_offset_factors_stay_fp32_under_bf16_and_the_export_is_the_fp32_update(
        make_config, tmp_path, init, conv)
    placed()


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_fp16_exports_keep_fp16_precision(fmt, rank32_alpha1, tmp_path, placed):  # noqa: F811
    test_export_precision.test_an_fp16_export_of_a_rank32_alpha1_run_keeps_fp16_precision(fmt, rank32_alpha1, tmp_path)
    placed(new=False)  # trained in the module-scoped fixture
