"""Periodic merging (lora.merge_every, ReLoRA): the export is the total update, a merge leaves the model's output and
the base model alone, a killed run resumes bit-identically, the file loads in diffusers, and what it cannot carry
is refused in one line."""

import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from outputs import load_pipeline, max_abs_diff, model_outputs, pipeline_outputs, quiet
from sdlora.adapter.io import load_adapter
from sdlora.errors import UserError
from sdlora.lora import adapters_disabled, build_param_groups, inject_all
from sdlora.model.loading import load_components
from sdlora.training.checkpoint import checkpoints_dir
from sdlora.training.loop import train
from sdlora.training.optim import make_optimizer
from sdlora.training.periodic_merge import PeriodicMerge, pieces
from sdlora.training.signals import TrainingInterrupted

# fp32 throughout. Read back from the base weight, the update carries W' 's rounding: each of the n merges rounds
# W' (|W0| ~ 0.1-1 per entry, far above the update) to fp32, at most half an ulp, <= 2^-24 |W'| per add; the pieces'
# own fp32 products add ~1e-6 of the update. So each entry must agree to n·2^-23·|W'| + 1e-5·max|ΔW|; the error
# relative to ‖ΔW‖ is printed (it is dominated by W' 's rounding where a module's update is small).
TOL = 1e-5  # fp32 model outputs, as tests/test_lora_mechanics.py


def interrupt_at(step_to_stop):
    """A real SIGINT delivered to this process during step `step_to_stop` (as tests/test_checkpoint.py)."""
    def hook(step, loss):
        if step == step_to_stop:
            os.kill(os.getpid(), signal.SIGINT)
        return loss
    return hook


def merge_cfg(make_config, out=None, **lora):
    extra = {"output": {"dir": str(out)}} if out is not None else {}
    return make_config({"lora": {"merge_every": 2, "conv": True, "alpha": 3, **lora}, "train": {"max_steps": 5},
                        **extra})


def test_the_export_is_the_sum_of_the_merged_pieces_and_the_live_adapter(make_config):
    result = train(merge_cfg(make_config, learnable_alpha=True), log=quiet)  # merges after steps 2 and 4
    adapter = load_adapter(result.adapter_path)
    base = load_components(make_config().model.path)
    w0 = {**{f"unet.{n}": m.weight.detach() for n, m in base.unet.named_modules() if hasattr(m, "weight")},
          **{f"text_encoder.{n}": m.weight.detach() for n, m in base.text_encoder.named_modules() if hasattr(m, "weight")}}
    worst = 0.0
    for name, layer in result.layers.items():
        assert layer.merged_down.shape[0] == 2 * layer.rank, name  # two pieces of rank r
        record = adapter.modules[name]
        assert record.rank == 3 * layer.rank, name  # the live adapter's r, and 2r merged
        exported = record.up.double().flatten(1) @ record.down.double().flatten(1)
        # the truth: the base weight now holds W0 + Σ pieces; the live adapter adds s·B·A
        live = layer.scale().detach().double() * layer.lora_B.detach().double().flatten(1) @ layer.lora_A.detach().double().flatten(1)
        truth = (layer.base.weight.detach().double() - w0[name].double()).flatten(1) + live
        bound = pieces(layer) * 2.0 ** -23 * layer.base.weight.detach().double().abs().flatten(1) + 1e-5 * float(truth.abs().max())
        assert bool(((exported - truth).abs() <= bound).all()), (name, float(((exported - truth).abs() / bound).max()))
        worst = max(worst, float(torch.linalg.norm(exported - truth) / torch.linalg.norm(truth)))
    print(f"largest error relative to the update's norm: {worst:.1e}")


def test_a_merge_leaves_the_output_and_the_base_model_unchanged_and_resets_the_factors_moments(make_config):
    cfg = merge_cfg(make_config, learnable_alpha=True)
    comps = load_components(cfg.model.path)
    base = model_outputs(comps.unet, comps.text_encoder, comps.tokenizer)
    layers = inject_all(comps.adaptable(), cfg, comps.family)
    at_step0 = max_abs_diff(model_outputs(comps.unet, comps.text_encoder, comps.tokenizer), base)
    assert at_step0["unet"] <= TOL and at_step0["text_encoder"] <= TOL, at_step0  # step 0 is the base model's
    groups = build_param_groups(layers, cfg, comps.family)
    optimizer = make_optimizer(groups.groups, cfg)
    merges = PeriodicMerge(layers, 2, 10, 0, optimizer)
    gen = torch.Generator().manual_seed(5)
    for layer in layers.values():  # a trained adapter, and an optimiser that has stepped
        with torch.no_grad():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.05)
        for p in layer.trainable_parameters().values():
            p.grad = torch.randn(p.shape, generator=gen)
    optimizer.step()
    trained = model_outputs(comps.unet, comps.text_encoder, comps.tokenizer)
    merges(2)
    after = max_abs_diff(model_outputs(comps.unet, comps.text_encoder, comps.tokenizer), trained)
    assert after["unet"] <= TOL and after["text_encoder"] <= TOL, after  # the update moved into W', not lost
    with adapters_disabled(comps.unet, comps.text_encoder):  # the base model is still W0 (preservation's target)
        disabled = max_abs_diff(model_outputs(comps.unet, comps.text_encoder, comps.tokenizer), base)
    assert disabled["unet"] <= TOL and disabled["text_encoder"] <= TOL, disabled
    for layer in layers.values():
        assert float(layer.lora_B.detach().abs().max()) == 0  # restarted: the zero init's B
        assert layer.lora_A not in optimizer.state and layer.lora_B not in optimizer.state
        assert layer.alpha in optimizer.state  # a learnable alpha keeps its moments


@pytest.mark.parametrize("stop_at", [3, 4], ids=["between-merges", "at-a-merge"])
def test_a_killed_run_resumes_bit_identically(make_config, tmp_path, stop_at):
    """The same ops in the same order, with the same thread count (OMP_NUM_THREADS=1 here), give the same bits."""
    common = {"lora": {"merge_every": 2, "alpha": 3}, "train": {"max_steps": 6},
              "optim": {"scheduler": "cosine", "warmup_steps": 2, "max_grad_norm": 1.0},
              "checkpoint": {"every_steps": 2, "keep_last": 2}}
    full = train(make_config(common, output={"dir": str(tmp_path / "full")}), log=quiet)
    cfg = make_config(common, output={"dir": str(tmp_path / "cut")})
    with pytest.raises(TrainingInterrupted):
        train(cfg, fault_hook=interrupt_at(stop_at), log=quiet)
    assert (checkpoints_dir(cfg.output.dir) / f"step_{stop_at:06d}" / "merged.safetensors").is_file()
    resumed = train(cfg, resume="latest", log=quiet)
    got, want = load_file(resumed.adapter_path), load_file(full.adapter_path)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in got), [k for k in got if not torch.equal(got[k], want[k])][:3]
    for name, layer in resumed.layers.items():  # the base weights hold the same bits as well
        assert torch.equal(layer.base.weight, full.layers[name].base.weight), name


def test_the_export_loads_in_diffusers_and_equals_the_trained_model(make_config, tiny_model):
    result = train(merge_cfg(make_config), log=quiet)
    c = result.components
    c.unet.eval(), c.text_encoder.eval()
    ours = model_outputs(c.unet, c.text_encoder, c.tokenizer)
    pipe = load_pipeline(tiny_model)
    pipe.load_lora_weights(str(result.adapter_path))
    diff = max_abs_diff(ours, pipeline_outputs(pipe))
    assert diff["unet"] <= TOL and diff["text_encoder"] <= TOL, diff


def test_reduce_rank_cuts_the_total_back_to_r_and_reports_the_share_kept(make_config):
    lines = []
    cfg = make_config({"lora": {"merge_every": 2}, "train": {"max_steps": 5}, "export": {"reduce_rank": True}})
    result = train(cfg, log=lines.append)
    assert all(m.rank == 4 for m in load_adapter(result.adapter_path).modules.values())
    assert any("rank 12 -> 4" in line and "of the update's squared Frobenius norm" in line for line in lines), lines[-3:]


@pytest.mark.parametrize("extra, named", [
    ({"lora": {"type": "dora"}}, "lora.type"), ({"lora": {"type": "loha"}}, "lora.type"),
    ({"lora": {"init": "principal"}}, "lora.init=principal"), ({"train": {"ema": {"enabled": True}}}, "train.ema"),
    ({"optim": {"optimizer": "adamw_schedulefree"}}, "adamw_schedulefree"),
    ({"model": {"base_precision": "fp8"}}, "model.base_precision=fp8")])
def test_what_periodic_merging_cannot_carry_is_refused_in_one_line(make_config, extra, named):
    cfg = make_config(extra, lora={**extra.get("lora", {}), "merge_every": 2})
    with pytest.raises(UserError, match=named) as info:
        train(cfg, log=quiet)
    assert "\n" not in str(info.value)
