"""model.base_precision (model/low_bits.py): a frozen base stored in fp8 / int8 / int4 trains LoRA in fp32, its
step-0 output is the stored base's, its exports are the trained update on the full-precision base, and a resumed
run is bit-identical."""

import pytest
import torch
from safetensors.torch import load_file

from outputs import load_pipeline, max_abs_diff, model_outputs, pipeline_outputs
from sdlora.adapter.algebra import merge_adapter
from sdlora.adapter.io import load_adapter
from sdlora.errors import UserError
from sdlora.lora import adapters_disabled
from sdlora.model.loading import load_components
from sdlora.model.low_bits import LowBitConv2d, LowBitLinear, store_low_bits, stored_bytes
from sdlora.training.loop import train
from sdlora.training.placement import place_models
from sdlora.training.setup import build_model
from sdlora.training.signals import TrainingInterrupted
from sdxl_fixtures import sdxl_config, tiny_sdxl  # noqa: F401 (fixtures)

pytest.importorskip("optimum.quanto")


def quiet(*a, **k):
    pass


def placed(cfg):
    comps, layers, _ = build_model(cfg, quiet)
    place_models(comps, layers, torch.device("cpu"), torch.float32, cfg)
    return comps, layers


def linear_weight_bytes(model) -> tuple[int, int]:
    """(bytes the Linear weights take, their number of weights)."""
    mods = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return sum(stored_bytes(m.weight) for m in mods), sum(m.weight.numel() for m in mods)


@pytest.mark.parametrize("precision, most", [("fp8", 1.0), ("int8", 1.2)])  # int8: + one fp32 scale per row
def test_the_frozen_linear_weights_of_denoiser_and_text_encoder_are_stored_in_one_byte(make_config, precision, most):
    comps, _ = placed(make_config(model={"base_precision": precision}))
    full, _ = placed(make_config())
    for model, ref in ((comps.denoiser, full.denoiser), (comps.text_encoders["text_encoder"],
                                                         full.text_encoders["text_encoder"])):
        stored, n = linear_weight_bytes(model)
        assert linear_weight_bytes(ref) == (4 * n, n)  # fp32 training dtype: 4 bytes each
        assert n <= stored <= most * n, (stored, n)
    assert any(isinstance(m, LowBitConv2d) for m in comps.denoiser.modules())
    assert all(p.dtype == torch.float32 for layer in _.values() for p in layer.parameters())  # adapters stay fp32
    assert comps.vae.decoder.conv_in.weight.dtype == torch.float32  # the VAE is left alone


# Step 0: the adapted output equals the stored base's. TOL: fp32 products of O(1) activations; the orthogonal init's
# B·A = P·Q - P·Q cancels to rounding (~1e-7 relative), DoRA's m ⊙ V / ‖V‖ with m = ‖V‖ to a few ulps.
TOL = 1e-5


@pytest.mark.parametrize("precision, lora", [("fp8", {"init": "orthogonal"}), ("int8", {"init": "orthogonal"}),
                                             ("int8", {"type": "dora"}), ("int4", {"type": "dora", "init": "orthogonal"}),
                                             ("fp8", {"type": "loha"})])
def test_step_zero_output_with_a_non_zero_init_is_the_stored_bases(make_config, tiny_model, precision, lora):
    comps, layers = placed(make_config(model={"base_precision": precision}, lora={"rank": 4, "alpha": 4, **lora}))
    comps.denoiser.eval(), comps.text_encoders["text_encoder"].eval()
    assert any(isinstance(layer.base, LowBitLinear) for layer in layers.values())
    base = load_components(str(tiny_model))  # the same model, no adapters, stored the same way
    for model in (base.unet, base.text_encoder):
        store_low_bits(model, precision)
        model.eval()
    want = model_outputs(base.unet, base.text_encoder, base.tokenizer)
    unet, te, tok = comps.denoiser, comps.text_encoders["text_encoder"], comps.tokenizers[0]
    got = model_outputs(unet, te, tok)
    with adapters_disabled(unet, te):  # preservation's "adapters off": the stored base too
        off = model_outputs(unet, te, tok)
    full = model_outputs(load_components(str(tiny_model)).unet, base.text_encoder, base.tokenizer)
    for k in want:
        scale = float(want[k].abs().max())
        assert float((got[k] - want[k]).abs().max()) <= TOL * scale, (k, precision)
        assert float((off[k] - want[k]).abs().max()) <= TOL * scale, (k, precision)
    assert float((full["unet"] - want["unet"]).abs().max()) > 100 * TOL * float(want["unet"].abs().max())  # stored != full


@pytest.fixture(scope="module")
def fp8_run(tiny_model, shapes_data, tmp_path_factory):
    from sdlora.config import validate

    out = tmp_path_factory.mktemp("fp8") / "run"
    cfg = validate({"model": {"path": str(tiny_model), "base_precision": "fp8"},
                    "data": {"path": str(shapes_data), "resolution": 64}, "output": {"dir": str(out)},
                    "train": {"max_steps": 4, "batch_size": 2, "seed": 0}, "optim": {"lr": 1e-2},
                    "lora": {"rank": 4, "alpha": 4, "init": "orthogonal"}, "log": {"tracker": "none"}})
    return train(cfg, log=quiet)


def test_the_export_is_the_trained_update_and_loads_on_the_full_precision_base(fp8_run, tiny_model):
    exported = load_adapter(fp8_run.adapter_path)
    for name, layer in fp8_run.layers.items():  # fp32 products of the same factors: rounding only
        want = layer.delta_weight()
        got = exported.modules[name].delta_weight(layer.base.weight)
        assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max()), name
    full = load_components(str(tiny_model))
    with torch.no_grad():
        merge_adapter(exported, full.adaptable())
    want = model_outputs(full.unet, full.text_encoder, full.tokenizer)
    pipe = load_pipeline(tiny_model)
    base = pipeline_outputs(pipe)
    pipe.load_lora_weights(str(fp8_run.adapter_path))
    got = pipeline_outputs(pipe)
    assert all(v <= TOL * float(want[k].abs().max()) for k, v in max_abs_diff(got, want).items())
    assert all(v > 100 * TOL for v in max_abs_diff(got, base).values())  # the adapter moved the outputs


def test_merged_export_merges_into_the_full_precision_weights_of_the_model_files(fp8_run, tiny_model, tmp_path):
    from sdlora.commands.export import run_export

    folder = run_export(fp8_run.adapter_path, "merged-diffusers", tmp_path / "merged", base=str(tiny_model),
                        report=quiet)
    merged, full = load_components(str(folder)), load_components(str(tiny_model))
    name = next(n for n in fp8_run.layers if n.startswith("unet.") and fp8_run.layers[n].kind == "linear")
    path = name.split(".", 1)[1] + ".weight"
    w0 = full.unet.state_dict()[path].double()
    delta = fp8_run.layers[name].delta_weight().double()
    got = merged.unet.state_dict()[path].double()
    assert float((got - (w0 + delta)).abs().max()) <= 1e-6 * float(w0.abs().max())  # fp32 rounding of W0 + ΔW
    stored = w0.to(torch.float8_e4m3fn).double()
    assert float((got - (stored + delta)).abs().max()) > 1e-3 * float(w0.abs().max())  # not the fp8 weights


def test_an_int8_run_resumed_after_a_kill_is_bit_identical(make_config, tmp_path):
    import os
    import signal

    def cfg(out):
        return make_config({"output": {"dir": str(out)}, "model": {"base_precision": "int8"},
                            "train": {"max_steps": 4, "batch_size": 2}, "checkpoint": {"every_steps": 2}})

    train(cfg(tmp_path / "full"), log=quiet)

    def kill_at_3(step, loss):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    with pytest.raises(TrainingInterrupted):
        train(cfg(tmp_path / "cut"), fault_hook=kill_at_3, log=quiet)
    train(cfg(tmp_path / "cut"), resume="latest", log=quiet)
    a, b = load_file(tmp_path / "full" / "adapter.safetensors"), load_file(tmp_path / "cut" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ema_preservation_validation_and_fisher_run_on_an_int8_base(make_config, shapes_data, tmp_path):
    result = train(make_config({"model": {"base_precision": "int8"}, "train": {"max_steps": 2, "ema": {"enabled": True}},
                                "reg": {"preservation": {"weight": 1.0, "source": "prompts", "prompts": ["a red circle"]}},
                                "validation": {"every_steps": 1, "path": str(shapes_data), "timesteps": 2}, "export": {"fisher_samples": 2}}),
                   log=quiet)
    out = result.out_dir
    assert (out / "adapter_ema.safetensors").is_file() and all(map(lambda x: x == x, result.losses))
    assert "validation/loss" in (out / "metrics.jsonl").read_text()
    assert load_adapter(result.adapter_path).modules  # the Fisher pass re-saves the adapter with its estimate


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_sdxl_trains_on_a_stored_base(sdxl_config, precision):
    result = train(sdxl_config(model={"base_precision": precision}, train={"max_steps": 2}), log=quiet)
    assert result.step == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    te2 = result.components.text_encoders["text_encoder_2"]
    assert isinstance(te2.text_model.encoder.layers[0].mlp.fc1, LowBitLinear)


def test_offset_inits_and_a_missing_library_are_refused_in_one_line(make_config, monkeypatch):
    from sdlora.training import preflight

    with pytest.raises(UserError, match=r"lora.init: compensated .* \(allowed with it: zero, orthogonal\)"):
        preflight.before_model(make_config(model={"base_precision": "fp8"}, lora={"init": "compensated"}))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("optimum") else real(name, *a))
    with pytest.raises(UserError, match=r"int4 needs optimum-quanto.*sdlora\[quant\]"):
        preflight.before_model(make_config(model={"base_precision": "int4"}))
    preflight.before_model(make_config(model={"base_precision": "fp8"}))  # fp8 needs no library


def test_the_start_up_lines_say_how_the_base_is_stored(make_config):
    """A user sees the stored precision before any training (--dry-run included), not only in run/config.yaml."""
    lines = []
    train(make_config(model={"base_precision": "fp8"}), dry_run=True, log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert any(line.startswith("sdlora: model.base_precision fp8: the frozen Linear and Conv2d weights") for line in lines)
