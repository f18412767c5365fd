"""model.base_precision beyond SD 1.x LoRA (tests/test_low_bits.py): SD3.5 and SD 2.x v-prediction train on an fp8 /
int8 base through the real loop with the step-0 output the stored base's and an export that loads on the
full-precision base; LoKr on a low-bit base; `train.compile` with the low-bit autograd functions."""

import math

import pytest
import torch

from conftest import deep_update
from outputs import load_pipeline, max_abs_diff, model_outputs, pipeline_outputs
from sdlora.adapter.algebra import merge_adapter
from sdlora.adapter.io import load_adapter
from sdlora.model.loading import load_components
from sdlora.model.low_bits import LowBitLinear, store_low_bits
from sdlora.model.tiny import make_tiny_model
from sdlora.training.loop import train
from sdlora.training.placement import place_models
from sdlora.training.setup import build_model
from test_sd3_exports import outputs  # the SD3 family's conditioning and prediction on fixed inputs

pytest.importorskip("optimum.quanto")

# Step 0 and the loaded export: fp32 products of O(1) activations; the orthogonal init's B·A = P·Q - P·Q cancels to
# rounding (~1e-7 relative), and peft's base(x) + B(A(x))·s rounds in another order: 1e-5 of the output's scale.
TOL = 1e-5
T5_LEN = 8


def quiet(*_a, **_k):
    pass


def within(got: dict, want: dict, tol: float = TOL) -> bool:
    return all(float((got[k] - want[k]).abs().max()) <= tol * float(want[k].abs().max()) for k in want)


def stored_base(model_dir, precision):
    """The model as its files have it, Linear / Conv2d weights stored in `precision` (no adapters)."""
    comps = load_components(str(model_dir))
    for model in (comps.denoiser, *comps.text_encoders.values()):
        store_low_bits(model, precision)
        model.eval()
    return comps


# ------------------------------------------------------------------------------------------------------ SD3.5
@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_sd35_trains_on_a_stored_base_from_the_stored_bases_output_and_exports_for_the_full_base(
        tiny_sd35m, make_config, precision):
    from diffusers import StableDiffusion3Pipeline

    cfg = make_config({"model": {"path": str(tiny_sd35m), "base_precision": precision},
                       "text_encoder": {"t5_max_length": T5_LEN}, "train": {"max_steps": 3},
                       "optim": {"lr": 2e-2}, "lora": {"rank": 4, "alpha": 4, "init": "orthogonal"}})
    comps, layers, _ = build_model(cfg, quiet)
    place_models(comps, layers, torch.device("cpu"), torch.float32, cfg)
    family = comps.family.for_run(comps, cfg)
    assert any(isinstance(m, LowBitLinear) for m in comps.denoiser.modules())
    assert any(isinstance(m, LowBitLinear) for m in comps.text_encoders["text_encoder_3"].modules())  # T5 too
    for m in (comps.denoiser, *comps.text_encoders.values()):
        m.eval()
    base = stored_base(tiny_sd35m, precision)
    tok = comps.tokenizers
    want = outputs(base.denoiser, list(base.text_encoders.values()), tok, family)
    assert within(outputs(comps.denoiser, list(comps.text_encoders.values()), tok, family), want)  # step 0

    result = train(cfg, log=quiet)
    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)
    full = load_components(str(tiny_sd35m))  # the export merged in float into the model files' weights
    with torch.no_grad():
        merge_adapter(load_adapter(result.adapter_path), full.adaptable())
    full_family = full.family.for_run(full, cfg)
    merged = outputs(full.denoiser, list(full.text_encoders.values()), tok, full_family)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd35m)
    pipe.tokenizer_3.model_max_length = T5_LEN
    encoders = [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]
    before = outputs(pipe.transformer, encoders, tok, full_family)
    pipe.load_lora_weights(str(result.adapter_path))
    assert within(outputs(pipe.transformer, encoders, tok, full_family), merged)
    assert not within(before, merged, 100 * TOL)  # the adapter moved the outputs


# --------------------------------------------------------------------------------------------- SD 2.x (v)
@pytest.fixture(scope="module")
def tiny_sd2_v(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("sd2v") / "model", variant="sd2-v")


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_sd2_v_prediction_trains_on_a_stored_base_and_its_export_loads_on_the_full_base(
        tiny_sd2_v, make_config, precision):
    cfg = make_config({"model": {"path": str(tiny_sd2_v), "base_precision": precision}, "train": {"max_steps": 3},
                       "optim": {"lr": 2e-2}, "lora": {"rank": 4, "alpha": 4, "init": "orthogonal"}})
    comps, layers, _ = build_model(cfg, quiet)
    assert comps.prediction_type == "v_prediction"
    place_models(comps, layers, torch.device("cpu"), torch.float32, cfg)
    comps.denoiser.eval(), comps.text_encoder.eval()
    base = stored_base(tiny_sd2_v, precision)
    want = model_outputs(base.unet, base.text_encoder, base.tokenizer)
    assert within(model_outputs(comps.unet, comps.text_encoder, comps.tokenizer), want)  # step 0

    result = train(cfg, log=quiet)
    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)
    full = load_components(str(tiny_sd2_v))
    with torch.no_grad():
        merge_adapter(load_adapter(result.adapter_path), full.adaptable())
    merged = model_outputs(full.unet, full.text_encoder, full.tokenizer)
    pipe = load_pipeline(tiny_sd2_v)
    before = pipeline_outputs(pipe)
    pipe.load_lora_weights(str(result.adapter_path))
    got = pipeline_outputs(pipe)
    assert all(v <= TOL * float(merged[k].abs().max()) for k, v in max_abs_diff(got, merged).items())
    assert all(v > 100 * TOL for v in max_abs_diff(got, before).values())


# ------------------------------------------------------------------------------------------------------ LoKr
@pytest.mark.parametrize("precision", ["fp8", "int8", "int4"])
def test_lokr_on_a_stored_base_starts_at_its_output_and_trains(make_config, tiny_model, precision):
    """LoKr (zero-initialised w2) adds nothing at step 0: the adapted model is the stored base to rounding, through
    LowBitLinear / LowBitConv2d, convolutions included; then it trains."""
    cfg = make_config(model={"base_precision": precision}, train={"max_steps": 2}, optim={"lr": 1e-2},
                      lora={"type": "lokr", "rank": 4, "alpha": 4, "conv": True})
    comps, layers, _ = build_model(cfg, quiet)
    place_models(comps, layers, torch.device("cpu"), torch.float32, cfg)
    comps.denoiser.eval(), comps.text_encoder.eval()
    assert any(layer.kind == "conv" for layer in layers.values())
    base = stored_base(tiny_model, precision)
    want = model_outputs(base.unet, base.text_encoder, base.tokenizer)
    assert within(model_outputs(comps.unet, comps.text_encoder, comps.tokenizer), want)
    result = train(cfg, log=quiet)
    assert all(math.isfinite(x) for x in result.losses)
    exported = load_adapter(result.adapter_path)
    assert any(float(m.delta_weight(result.layers[n].base.weight).abs().max()) > 0 for n, m in exported.modules.items())


# --------------------------------------------------------------------------------------------- train.compile
@pytest.mark.slow  # about 100 s on one core: dynamo traces the tiny UNet twice (forward and backward graphs)
@pytest.mark.parametrize("precision", ["int8"])  # quanto's tensors through dynamo (fp8 is a plain cast; it passed too)
def test_compile_trains_on_a_stored_base_and_its_first_loss_is_the_eager_one(make_config, tmp_path, monkeypatch,
                                                                               precision):
    # inductor's C++ kernels take minutes to build on 2 shared cores; aot_eager traces the same graphs (dynamo, the
    # low-bit autograd functions, the LoRA layers) without generating code (as tests/test_gpu_training.py does)
    compile_eager = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_eager(self, backend="aot_eager"))
    runs = {c: train(make_config(deep_update({"model": {"base_precision": precision}},
                                             {"output": {"dir": str(tmp_path / str(c))},
                                              "train": {"max_steps": 2, "compile": c}})), log=quiet)
            for c in (False, True)}
    assert runs[True].components.unet._compiled_call_impl is not None  # nn.Module.compile took effect
    eager, compiled = runs[False].losses, runs[True].losses
    # the same weights and batch at step 1; the graph reorders fp32 arithmetic only (~1e-6 of a loss about 1)
    assert abs(eager[0] - compiled[0]) <= 1e-4 * abs(eager[0]), (eager, compiled)
    assert all(math.isfinite(x) for x in compiled) and len(compiled) == 2
