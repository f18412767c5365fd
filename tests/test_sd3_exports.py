"""SD3 / SD3.5 exports (issue 27 item 6): the diffusers layout that StableDiffusion3Pipeline.load_lora_weights loads
exactly, moving the transformer and both CLIP encoders."""

import pytest
import torch

from conftest import deep_update
from sdlora.model.loading import load_components
from sdlora.model.text import tokenize
from sdlora.training.loop import train

T5_LEN = 8


def quiet(*_a, **_k):
    pass


@pytest.fixture(scope="module")
def trained_sd35m(tiny_sd35m, shapes_data, tmp_path_factory):
    """A tiny SD3.5 Medium trained 3 steps at a high rate (the adapters move well away from zero), text encoders
    included, rank 4 with alpha 2 (a scale other than 1 must reach the file)."""
    from sdlora.config import validate

    cfg = validate({"model": {"path": str(tiny_sd35m)}, "data": {"path": str(shapes_data), "resolution": 64},
                    "output": {"dir": str(tmp_path_factory.mktemp("sd35m_run") / "run")},
                    "train": {"max_steps": 3, "batch_size": 2, "seed": 0}, "optim": {"lr": 2e-2},
                    "lora": {"rank": 4, "alpha": 2}, "log": {"tracker": "none"},
                    "text_encoder": {"t5_max_length": T5_LEN}})
    return cfg, train(cfg, log=quiet)


def outputs(transformer, text_encoders: list, tokenizers: list, family):
    """The conditioning and the transformer's prediction on fixed inputs, through sdlora's family."""
    ids = [tokenize(t, ["a red circle", "blue square"], 75) for t in tokenizers]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        cond = family.encode(text_encoders, ids, 1)
        pred = family.predict(transformer, torch.randn(2, 16, 8, 8, generator=gen), torch.tensor([300.0, 800.0]), cond)
    return {"hidden": cond.hidden, "pooled": cond.pooled, "prediction": pred}


def close(a, b) -> bool:
    """Equal up to fp32 rounding: peft computes base(x) + B(A(x))·s as sdlora does, in another association order
    for some modules; 1e-5 of the quantity's scale."""
    return torch.allclose(a, b, rtol=0, atol=1e-5 * float(b.abs().max()))


def test_stable_diffusion_3_pipeline_load_lora_weights_loads_the_export_exactly(trained_sd35m, tiny_sd35m):
    from diffusers import StableDiffusion3Pipeline

    cfg, result = trained_sd35m
    comps = result.components
    family = comps.family
    ours = outputs(comps.denoiser, list(comps.text_encoders.values()), comps.tokenizers, family)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd35m)
    pipe.tokenizer_3.model_max_length = T5_LEN
    encoders, tokenizers = [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3], \
        [pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3]
    base = outputs(pipe.transformer, encoders, tokenizers, family)
    pipe.load_lora_weights(str(result.adapter_path))
    theirs = outputs(pipe.transformer, encoders, tokenizers, family)
    for key in ours:
        assert close(theirs[key], ours[key]), key
        assert not close(base[key], ours[key]), key  # the adapter moves the transformer and both CLIPs
    # each CLIP moves on its own (their tokens side by side in the conditioning's first 77 positions)
    w_l = comps.text_encoders["text_encoder"].config.hidden_size
    clip_l, clip_g = (slice(0, w_l), slice(w_l, None))
    for part in (clip_l, clip_g):
        assert not close(base["hidden"][:, :77, part], ours["hidden"][:, :77, part])


def test_the_merged_diffusers_folder_through_diffusers_equals_the_trained_model(trained_sd35m, tmp_path):
    """`sdlora export --format merged-diffusers` of the run, loaded by StableDiffusion3Pipeline.from_pretrained:
    the same outputs as sdlora's trained model (merging W0 + s·B·A in fp32 rounds once per weight: 1e-5 of scale)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from sdlora.commands.export import run_export

    cfg, result = trained_sd35m
    comps = result.components
    out = run_export(result.adapter_path, "merged-diffusers", tmp_path / "merged", base=cfg.model.path, report=quiet)
    pipe = StableDiffusion3Pipeline.from_pretrained(out)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 3.0
    pipe.tokenizer_3.model_max_length = T5_LEN
    theirs = outputs(pipe.transformer, [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3],
                     [pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3], comps.family)
    ours = outputs(comps.denoiser, list(comps.text_encoders.values()), comps.tokenizers, comps.family)
    for key in ours:
        assert close(theirs[key], ours[key]), key


def test_the_diffusers_export_loaded_by_the_pipeline_equals_the_merged_folder(trained_sd35m, tiny_sd35m, tmp_path):
    """StableDiffusion3Pipeline.load_lora_weights(the run's adapter) on the base against the merged folder, both
    through diffusers (peft's base(x) + B(A(x)) against the merged W0 + BA, fp32: 1e-5 of the quantity's scale)."""
    from diffusers import StableDiffusion3Pipeline

    from sdlora.commands.export import run_export

    cfg, result = trained_sd35m
    merged = StableDiffusion3Pipeline.from_pretrained(
        run_export(result.adapter_path, "merged-diffusers", tmp_path / "merged", base=cfg.model.path, report=quiet))
    loaded = StableDiffusion3Pipeline.from_pretrained(tiny_sd35m)
    loaded.load_lora_weights(str(result.adapter_path))
    got = []
    for pipe in (loaded, merged):
        pipe.tokenizer_3.model_max_length = T5_LEN
        got.append(outputs(pipe.transformer, [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3],
                           [pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3], result.components.family))
    for key in got[0]:
        assert close(got[0][key], got[1][key]), key


@pytest.fixture(scope="module")
def kohya_file(trained_sd35m, tmp_path_factory):
    from sdlora.commands.export import run_export

    _, result = trained_sd35m
    return run_export(result.adapter_path, "kohya", tmp_path_factory.mktemp("kohya") / "a.safetensors", report=quiet)


def test_the_kohya_export_has_kohyas_sd3_names_and_labels(kohya_file, trained_sd35m):
    from safetensors import safe_open

    _, result = trained_sd35m
    with safe_open(str(kohya_file), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    stems = {k.split(".")[0] for k in keys}
    assert {"lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_unet_joint_blocks_0_context_block_attn_qkv",
            "lora_unet_joint_blocks_0_x_block_attn2_qkv", "lora_unet_joint_blocks_0_x_block_attn_proj",
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"} <= stems
    assert all(s.startswith(("lora_unet_joint_blocks_", "lora_te1_text_model_", "lora_te2_text_model_")) for s in stems)
    assert meta["ss_base_model_version"] == "5-medium"  # kohya's sd3_utils model type; sai_model_spec's architecture
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"
    assert meta["ss_network_module"] == "networks.lora_sd3"  # what kohya's sd3_train_network runs write
    assert (result.out_dir / "adapter_kohya.safetensors").is_file()  # the run writes it too


def _same_updates(a, b):
    """Equal per-module updates: the kohya writer rescales a fused module's factors for the file's one alpha (by
    r_q + r_k + r_v over it) in fp32, so 1e-6 of each update's scale is rounding. A module `a` lacks must have no
    update: a fused qkv's third whose update is zero reads back as no module (the last block's add_q_proj: that
    block drops the text stream's output, so the text queries get no gradient and B stays at its zero init)."""
    assert set(a.modules) <= set(b.modules)
    for name, m in b.modules.items():
        want = m.delta_weight().double()
        if name not in a.modules:
            assert ".add_q_proj" in name and not bool(want.any()), name
            continue
        got = a.modules[name].delta_weight().double()
        assert a.modules[name].rank == m.rank, name
        assert torch.allclose(got, want, rtol=0, atol=1e-6 * float(want.abs().max())), name


def test_the_kohya_export_read_back_and_exported_again_equals_the_diffusers_export(kohya_file, trained_sd35m, tmp_path):
    from sdlora.adapter.io import load_adapter
    from sdlora.analysis.inspect import inspect_adapter
    from sdlora.commands.export import run_export

    _, result = trained_sd35m
    ours = load_adapter(result.adapter_path)
    _same_updates(load_adapter(kohya_file), ours)
    again = run_export(kohya_file, "diffusers", tmp_path / "again.safetensors", report=quiet)
    _same_updates(load_adapter(again), ours)
    theirs, mine = inspect_adapter(kohya_file), inspect_adapter(result.adapter_path)
    assert theirs["layout"] == "kohya"
    theirs, mine = ({e["name"]: e for e in r["modules"]} for r in (theirs, mine))
    assert set(theirs) == {n for n, e in mine.items() if e["dw_norm"] > 0}
    for name, t in theirs.items():
        m = mine[name]
        assert (t["rank"], t["alpha"]) == (m["rank"], m["alpha"]) and t["dw_norm"] == pytest.approx(m["dw_norm"], rel=1e-5)


def test_lora_init_from_the_kohya_export_starts_from_the_trained_updates(kohya_file, trained_sd35m):
    from sdlora.adapter.io import load_adapter
    from sdlora.config import validate
    from sdlora.training.export import adapter_from_layers
    from sdlora.training.setup import build_model

    cfg, result = trained_sd35m
    raw = deep_update(cfg.to_dict(), {"lora": {"init_from": str(kohya_file)}, "text_encoder": {"train": True}})
    _, layers, _ = build_model(validate(raw), quiet)
    _same_updates(adapter_from_layers(layers), load_adapter(result.adapter_path))


def test_the_kohya_export_applied_by_kohyas_formula_on_the_original_weights_equals_the_merged_folder(
        kohya_file, trained_sd35m, tiny_sd35m, tmp_path):
    """Independent of sdlora's reader: every key of the file applied as kohya and ComfyUI apply it
    (W += alpha / rank · up @ down, rank = lora_down's rows) on the base model's weights, the transformer's in the
    original MMDiT layout (mmdit_keys.to_original, checked against diffusers' single-file converter), equals the
    merged diffusers folder's weights in that layout (the run's diffusers-layout export merged; a fused qkv read with alpha / rank of its parts only, as kohya's
    split_qkv files are, would put 2/3 of each update off)."""
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import load_file
    from transformers import CLIPTextModelWithProjection

    from sdlora.commands.export import run_export
    from sdlora.model.mmdit_keys import to_original

    cfg, result = trained_sd35m  # the run's diffusers-layout adapter merged: nothing here reads the kohya file but the test
    merged = run_export(result.adapter_path, "merged-diffusers", tmp_path / "merged", base=cfg.model.path, report=quiet)
    sd = load_file(str(kohya_file))
    models = {}
    for part, prefix in (("transformer", "lora_unet_"), ("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")):
        cls = SD3Transformer2DModel if part == "transformer" else CLIPTextModelWithProjection
        base, done = (cls.from_pretrained(str(folder / part)) for folder in (tiny_sd35m, merged))
        w0, want = base.state_dict(), done.state_dict()
        if part == "transformer":
            w0, want = to_original(w0, base.config), to_original(want, base.config)
        flat = {k.removesuffix(".weight").replace(".", "_"): k for k in w0 if k.endswith(".weight")}
        got = {k: v.double() for k, v in w0.items()}
        stems = {k.split(".")[0] for k in sd if k.startswith(prefix)}
        for stem in stems:
            down, up = sd[f"{stem}.lora_down.weight"].double(), sd[f"{stem}.lora_up.weight"].double()
            got[flat[stem.removeprefix(prefix)]] += float(sd[f"{stem}.alpha"]) / down.shape[0] * up @ down
        moved = max(float((want[k] - w0[k]).abs().max()) for k in want)
        for k in want:  # fp32 merge W0 + ΔW, rounded once: 1e-6 of the weights' scale (~1)
            assert torch.allclose(got[k], want[k].double(), rtol=0, atol=1e-6 * float(w0[k].abs().max().clamp(min=1))), k
        assert moved > 1e-3, part  # the merge moved the part far beyond the tolerance
        models[part] = len(stems)
    assert all(models.values())


def test_a_model_without_t5_exports_a_merged_folder_without_t5(tiny_sd3_no_t5, make_config, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from sdlora.commands.export import run_export

    cfg = make_config({"model": {"path": str(tiny_sd3_no_t5)}, "train": {"max_steps": 1},
                       "text_encoder": {"t5_max_length": T5_LEN}})
    result = train(cfg, log=quiet)
    out = run_export(result.adapter_path, "merged-diffusers", tmp_path / "merged", base=cfg.model.path, report=quiet)
    assert not (out / "text_encoder_3").exists()
    pipe = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None)
    assert pipe.text_encoder_3 is None and load_components(str(out)).family.name == "sd3"
