"""`sdlora export`: kohya files that diffusers loads exactly, kohya naming on the real SD 1.5 architecture,
merged diffusers folders and single files that reproduce the trained model, overwrite and atomicity rules.

"Trained" here means injected LoRA layers whose A, B (and learnable alpha) were moved away from their
initial values: export must reproduce whatever state the layers are in, and a perturbation reaches
every factor without the time of a training run.
"""

import json

import pytest
import torch
from accelerate import init_empty_weights

from outputs import load_pipeline, max_abs_diff, model_outputs, pipeline_outputs
from sdlora.cli import main
from sdlora.errors import UserError
from sdlora.training.export import export_adapter
from sdlora.commands.export import run_export
from sdlora.adapter.kohya import canonical_from_kohya, kohya_name
from sdlora.lora import inject_all
from sdlora.model.loading import load_components
from sdlora.adapter.run_record import RunRecord
from sdlora.model.families import SD1

TOL = 1e-5


def _trained(make_config, run_dir, *, init, learnable, conv, seed=0):
    cfg = make_config(lora={"init": init, "learnable_alpha": learnable, "conv": conv, "alpha": 3, "rank": 4},
                      output={"dir": str(run_dir)})
    comps = load_components(cfg.model.path)
    layers = inject_all(comps.adaptable(), cfg, comps.family)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_A.add_(0.2 * torch.randn(layer.lora_A.shape, generator=g))
            layer.lora_B.add_(0.2 * torch.randn(layer.lora_B.shape, generator=g))
            if learnable:
                layer.alpha.mul_(1.0 + 0.5 * float(torch.rand((), generator=g)))
    comps.unet.eval(), comps.text_encoder.eval()
    run_dir.mkdir(parents=True, exist_ok=True)
    export_adapter(layers, run_dir / "adapter.safetensors", cfg, RunRecord.from_training(cfg, comps), steps=10)
    return comps, model_outputs(comps.unet, comps.text_encoder, comps.tokenizer)


KOHYA_CASES = [("zero", False, False), ("zero", True, True), ("orthogonal", False, True), ("orthogonal", True, False),
               ("compensated", False, False), ("compensated", True, True), ("principal", False, True),
               ("principal", True, False)]


@pytest.mark.parametrize("init, learnable, conv", KOHYA_CASES,
                         ids=[f"{i}-{'la' if la else 'fa'}-{'conv' if c else 'lin'}" for i, la, c in KOHYA_CASES])
def test_kohya_export_loads_in_diffusers_and_reproduces_the_trained_model(make_config, shared_pipe, tmp_path,
                                                                          init, learnable, conv):
    _, ours = _trained(make_config, tmp_path / "run", init=init, learnable=learnable, conv=conv)
    out = run_export(tmp_path / "run", "kohya", tmp_path / "lora.safetensors", report=lambda *_: None)
    shared_pipe.load_lora_weights(str(out))
    try:
        diff = max_abs_diff(ours, pipeline_outputs(shared_pipe))
    finally:
        shared_pipe.unload_lora_weights()
    assert diff["unet"] <= TOL and diff["text_encoder"] <= TOL, diff


@pytest.fixture(scope="module")
def shared_pipe(tiny_model):
    """One pipeline for all kohya cases (unload_lora_weights restores it); checked against a fresh one once."""
    return load_pipeline(tiny_model)


def test_unloading_restores_the_shared_pipeline(shared_pipe, tiny_model):
    diff = max_abs_diff(pipeline_outputs(load_pipeline(tiny_model)), pipeline_outputs(shared_pipe))
    assert diff["unet"] == 0 and diff["text_encoder"] == 0, diff


def _kohya_reference_names(unet, text_encoder):
    """kohya sd-scripts' naming, restated: for each target block class, every Linear / Conv2d inside it is
    `lora_unet_` + `<block path>.<child path>` with dots as underscores (`lora_te_` for CLIP, whose paths
    start with text_model. in transformers 4, which kohya targets)."""
    names = set()
    blocks = {"Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"}
    for prefix, model, classes, top in (("lora_unet", unet, blocks, ""),
                                        ("lora_te", text_encoder, {"CLIPAttention", "CLIPMLP"}, "text_model.")):
        for name, module in model.named_modules():
            if type(module).__name__ in classes:
                for child, sub in module.named_modules():
                    if child and isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d)):
                        names.add(f"{prefix}.{top}{name}.{child}".replace(".", "_"))
    return names


def test_kohya_names_follow_kohya_for_every_adaptable_module_of_sd15(make_config):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdlora.model.single_file import BUNDLED_CONFIGS
    from sdlora.lora.inject import plan_denoiser, plan_text_encoder

    root = BUNDLED_CONFIGS / "sd_v1"
    te_cfg = {k: v for k, v in json.loads((root / "text_encoder/config.json").read_text()).items()
              if k not in ("architectures", "model_type")}
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(json.loads((root / "unet/config.json").read_text()))
        te = CLIPTextModel(CLIPTextConfig(**te_cfg))
    every = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "time_emb_proj"]
    cfg = make_config(lora={"conv": True, "unet_targets": every,
                            "text_encoder_targets": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]})
    ours = [f"unet.{p}" for p in plan_denoiser(unet, cfg.lora)] + [f"text_encoder.{p}" for p in plan_text_encoder(te, cfg.lora)]
    reference = _kohya_reference_names(unet, te)
    assert len(ours) == len(reference)
    assert {kohya_name(n, SD1) for n in ours} == reference  # the whole kohya target set, nothing more
    for n in ours:  # and every name reads back without the model
        assert canonical_from_kohya(kohya_name(n, SD1)) == n


@pytest.fixture(scope="module")
def merged_case(tmp_path_factory, tiny_model):
    """One trained state with every kind of module: offset init, learnable alpha, conv adapters."""
    from sdlora.config import validate

    root = tmp_path_factory.mktemp("merged")
    data = root / "data"
    data.mkdir()
    make_config = lambda **kw: validate({  # noqa: E731
        "model": {"path": str(tiny_model)}, "data": {"path": str(data), "resolution": 64},
        "output": kw["output"], "train": {"max_steps": 10, "batch_size": 2, "seed": 0},
        "lora": {"rank": 4, "alpha": 4, **kw["lora"]}, "log": {"tracker": "none"}})
    comps, ours = _trained(make_config, root / "run", init="principal", learnable=True, conv=True, seed=3)
    return root, ours


def test_merged_diffusers_folder_reproduces_the_trained_model(merged_case, tiny_model, tmp_path):
    root, ours = merged_case
    base = tiny_model
    out = tmp_path / "merged"
    assert main(["export", str(root / "run"), "--format", "merged-diffusers", "--out", str(out), "--base", str(base)]) == 0
    loaded = load_components(str(out))
    diff = max_abs_diff(ours, model_outputs(loaded.unet, loaded.text_encoder, loaded.tokenizer))
    assert diff["unet"] <= TOL and diff["text_encoder"] <= TOL, diff
    assert not any(p.name.startswith(".merged.") for p in tmp_path.iterdir())  # no temp folder left behind


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_merged_single_file_reproduces_the_trained_model(merged_case, tiny_model, tmp_path, dtype):
    root, ours = merged_case
    out = run_export(root / "run" / "adapter.safetensors", "merged-single-file", tmp_path / "merged.safetensors",
                     dtype=dtype, base=str(tiny_model), report=lambda *_: None)
    loaded = load_components(str(out), config_dir=str(tiny_model))
    theirs = model_outputs(loaded.unet, loaded.text_encoder, loaded.tokenizer)
    for k in ours:
        err = float((theirs[k] - ours[k]).abs().max())
        limit = TOL if dtype == "fp32" else 1e-2 * float(ours[k].abs().max())  # fp16: within 1e-2 relative
        assert err <= limit, (k, err, limit)


def test_export_refuses_to_overwrite_without_force(merged_case, tmp_path):
    root, _ = merged_case
    out = tmp_path / "lora.safetensors"
    run_export(root / "run", "kohya", out, report=lambda *_: None)
    written = out.read_bytes()
    with pytest.raises(UserError, match="--force"):
        run_export(root / "run", "kohya", out, report=lambda *_: None)
    assert out.read_bytes() == written
    assert main(["export", str(root / "run"), "--format", "diffusers", "--out", str(out)]) == 2
    run_export(root / "run", "diffusers", out, force=True, report=lambda *_: None)
    assert out.read_bytes() != written
    out.write_bytes(b"precious")  # a file sdlora did not write: never replaced, --force or not
    with pytest.raises(UserError, match="sdlora did not write it"):
        run_export(root / "run", "diffusers", out, force=True, report=lambda *_: None)
    assert out.read_bytes() == b"precious"


def test_export_from_a_checkpoint_folder_and_with_base_override(merged_case, tiny_model, tmp_path):
    root, ours = merged_case
    step = tmp_path / "run" / "checkpoints" / "step_000010"
    step.mkdir(parents=True)
    (step / "adapter.safetensors").write_bytes((root / "run" / "adapter.safetensors").read_bytes())
    out = run_export(step, "merged-diffusers", tmp_path / "m", base=str(tiny_model), report=lambda *_: None)
    loaded = load_components(str(out))
    assert max_abs_diff(ours, model_outputs(loaded.unet, loaded.text_encoder, loaded.tokenizer))["unet"] <= TOL
    with pytest.raises(UserError, match="checkpoints/step_NNNNNN"):
        run_export(tmp_path / "run", "kohya", tmp_path / "x.safetensors", report=lambda *_: None)


def test_model_prediction_type_sets_the_training_target_and_every_export_records_it(tiny_model, tmp_path):
    """model.prediction_type=v_prediction on an epsilon model: the loss target is v = sqrt(ab)·eps - sqrt(1-ab)·x0,
    and the kohya metadata, a merged diffusers folder and a merged single file all say v."""
    from safetensors import safe_open

    from sdlora.config import validate
    from sdlora.training.losses import diffusion_target

    cfg = validate({"model": {"path": str(tiny_model), "prediction_type": "v_prediction"},
                    "data": {"path": str(tmp_path)}, "output": {"dir": str(tmp_path / "run")},
                    "lora": {"rank": 4, "alpha": 4}, "log": {"tracker": "none"}})
    assert load_components(str(tiny_model)).prediction_type == "epsilon"
    comps = load_components(str(tiny_model), prediction_type=cfg.model.prediction_type)
    assert comps.prediction_type == "v_prediction"
    x0, eps, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    ab = comps.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = ab.sqrt() * eps - (1 - ab).sqrt() * x0
    assert float((diffusion_target(comps.noise_scheduler, x0, eps, t) - v).abs().max()) <= 1e-5

    layers = inject_all(comps.adaptable(), cfg, comps.family)
    adapter = tmp_path / "run" / "adapter.safetensors"
    adapter.parent.mkdir()
    export_adapter(layers, adapter, cfg, RunRecord.from_training(cfg, comps), steps=1)
    quiet = lambda *_: None  # noqa: E731
    with safe_open(str(run_export(adapter, "kohya", tmp_path / "k.safetensors", report=quiet)), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.prediction_type"] == "v" and meta["ss_v_parameterization"] == "True"
    folder = run_export(adapter, "merged-diffusers", tmp_path / "merged", base=str(tiny_model), report=quiet)
    assert load_components(str(folder)).prediction_type == "v_prediction"
    single = run_export(adapter, "merged-single-file", tmp_path / "m.safetensors", base=str(tiny_model), report=quiet)
    with safe_open(str(single), "pt") as f:
        assert f.metadata()["modelspec.prediction_type"] == "v"
