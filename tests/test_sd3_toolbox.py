"""The adapter toolbox on SD3 / SD3.5 (issue 27 item 8): merge (concat, svd, fisher), resize, extract,
lora.init_from, lora.init_alphas_from and the Fisher estimate, on tiny SD3.5 Medium adapters that
`StableDiffusion3Pipeline.load_lora_weights` reads; what cannot apply is refused in one line.

Float tolerances: the toolbox's maths is float64 on fp32 factors (rounding only, 1e-6 relative); outputs through
diffusers are compared at 1e-5 of the output's scale, as test_sd3_exports does (peft adds B(A(x))·s in another
association order than a dense float64 update).
"""

import pytest
import torch

from sdlora.adapter.family import adapter_family
from sdlora.adapter.fisher import RowFisher
from sdlora.adapter.io import load_adapter
from sdlora.cli import main
from sdlora.model.families import SD3, SD35L, SD35M, SDXL
from sdlora.model.loading import load_components
from sdlora.model.text import tokenize
from sdlora.training.loop import train

T5_LEN = 8
REL = 1e-6


def quiet(*_a, **_k):
    pass


@pytest.fixture(scope="module")
def sd3_adapters(tiny_sd35m, shapes_data, tmp_path_factory):
    """A: diffusers' targets, both CLIPs, learnable alpha, rank 4; B: the kohya preset (every Linear of each joint
    block: modules A lacks), transformer only, rank 3. Three steps at a high rate (the factors move far from their
    init); each stores its row Fisher over 2 samples."""
    from sdlora.config import validate

    root = tmp_path_factory.mktemp("sd3_toolbox")

    def run(name, seed, lora, te):
        cfg = validate({"model": {"path": str(tiny_sd35m)}, "data": {"path": str(shapes_data), "resolution": 64},
                        "output": {"dir": str(root / name)}, "train": {"max_steps": 3, "batch_size": 2, "seed": seed},
                        "optim": {"lr": 2e-2}, "lora": lora, "log": {"tracker": "none"},
                        "text_encoder": {"train": te, "t5_max_length": T5_LEN}, "export": {"fisher_samples": 2}})
        return train(cfg, log=quiet).adapter_path

    a = run("a", 0, {"rank": 4, "alpha": 2, "learnable_alpha": True}, True)
    b = run("b", 1, {"rank": 3, "alpha": 3, "unet_targets": ["preset:kohya"]}, False)
    return a, b


@pytest.fixture(scope="module")
def sd3_pipe(tiny_sd35m):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd35m)
    pipe.tokenizer_3.model_max_length = T5_LEN
    return pipe


def _outputs(transformer, encoders, tokenizers, family):
    """The conditioning and the transformer's prediction on fixed inputs, through sdlora's family."""
    ids = [tokenize(t, ["a red circle", "blue square"], 75) for t in tokenizers]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        cond = family.encode(encoders, ids, 1)
        pred = family.predict(transformer, torch.randn(2, 16, 8, 8, generator=gen), torch.tensor([300.0, 800.0]), cond)
    return {"hidden": cond.hidden, "pooled": cond.pooled, "prediction": pred}


def _pipe_outputs(pipe, family):
    return _outputs(pipe.transformer, [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3],
                    [pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3], family)


def _reference(model_path, deltas: dict):
    """sdlora's loaded base model with the dense updates added in float64: what a loader must produce."""
    comps = load_components(str(model_path))
    comps.tokenizers_by_part["text_encoder_3"].model_max_length = T5_LEN
    from sdlora.adapter.algebra import component_module

    models = comps.adaptable()
    with torch.no_grad():
        for name, dw in deltas.items():
            w = component_module(models, name).weight
            w.copy_((w.double() + dw.reshape(w.shape)).float())
    return _outputs(comps.denoiser, list(comps.text_encoders.values()), comps.tokenizers, comps.family)


def _assert_loads_as(pipe, path, reference, family):
    pipe.load_lora_weights(str(path))
    try:
        theirs = _pipe_outputs(pipe, family)
    finally:
        pipe.unload_lora_weights()
    for key, ref in reference.items():
        assert torch.allclose(theirs[key], ref, rtol=0, atol=1e-5 * float(ref.abs().max())), key


def _dense(path, weight=1.0):
    return {n: weight * m.delta_weight().double() for n, m in load_adapter(path).modules.items()}


# ------------------------------------------------------------------------------------------------- merge
def test_sd3_concat_merge_loads_in_the_sd3_pipeline_as_both_updates_added(sd3_adapters, sd3_pipe, tiny_sd35m,
                                                                         tmp_path):
    from sdlora.commands.merge import run_merge

    a, b = sd3_adapters
    out = tmp_path / "m.safetensors"
    run_merge([str(a), str(b)], out, weights=[1.0, 0.5], report=quiet)
    merged = load_adapter(out)
    expected = _dense(a)
    for n, dw in _dense(b, 0.5).items():
        expected[n] = expected.get(n, 0) + dw
    assert set(merged.modules) == set(expected) and any(".ff." in n for n in expected)  # B's MLP modules too
    for n, dw in expected.items():
        assert float((merged.modules[n].delta_weight().double() - dw).norm()) <= REL * float(dw.norm()), n
    assert adapter_family(merged)[0] is SD35M
    comps = load_components(str(tiny_sd35m))
    _assert_loads_as(sd3_pipe, out, _reference(tiny_sd35m, expected), comps.family)


def test_sd3_svd_and_fisher_merges_are_rank_r_sd3_adapters(sd3_adapters, tmp_path):
    from sdlora.commands.merge import run_merge

    a, b = sd3_adapters
    svd, rows = run_merge([str(a), str(b)], tmp_path / "s.safetensors", method="svd", rank=2, report=quiet)
    total = _dense(a)
    for n, dw in _dense(b).items():
        total[n] = total.get(n, 0) + dw
    for n, dw in total.items():  # Eckart-Young: the best rank-2 error of the sum
        if float(dw.norm()) == 0:  # the last block's add_q_proj: its output is discarded, no gradient reaches it
            continue
        s = torch.linalg.svdvals(dw)
        got = float((svd.modules[n].delta_weight().double() - dw).norm() / dw.norm())
        assert abs(got - float(s[2:].norm() / s.norm())) <= 1e-5, n
    fisher, frows = run_merge([str(a), str(b)], tmp_path / "f.safetensors", method="fisher", rank=2, report=quiet)
    assert set(fisher.modules) == set(total) and all(m.rank <= 2 for m in fisher.modules.values())
    assert all(r["fisher_error"] is not None for r in frows)
    for path in ("s.safetensors", "f.safetensors"):
        assert adapter_family(load_adapter(tmp_path / path))[0] is SD35M


def test_sd3_merge_with_another_familys_adapter_is_refused(sd3_adapters, make_config, tmp_path, capsys):
    sd1 = train(make_config(train={"max_steps": 1}), log=quiet).adapter_path
    capsys.readouterr()
    assert main(["merge", str(sd3_adapters[0]), str(sd1), "--out", str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert "different model families" in err and "sd35m" in err and "\n" not in err


# ------------------------------------------------------------------------------------------------ resize
def test_sd3_resize_keeps_the_best_rank_r_update_and_loads_in_the_pipeline(sd3_adapters, sd3_pipe, tiny_sd35m,
                                                                          tmp_path):
    from sdlora.commands.resize import run_resize

    a, _ = sd3_adapters
    out = tmp_path / "r.safetensors"
    resized, _ = run_resize(a, out, "rank", 2, report=quiet)
    expected = {}
    for n, dw in _dense(a).items():
        u, s, vh = torch.linalg.svd(dw, full_matrices=False)
        expected[n] = (u[:, :2] * s[:2]) @ vh[:2]
        got = resized.modules[n].delta_weight().double()
        assert float((got - expected[n]).norm()) <= 1e-5 * float(dw.norm()), n
    assert adapter_family(load_adapter(out))[0] is SD35M
    _assert_loads_as(sd3_pipe, out, _reference(tiny_sd35m, expected), load_components(str(tiny_sd35m)).family)
    # FWSVD with the stored Fisher
    assert main(["resize", str(a), "--out", str(tmp_path / "rf.safetensors"), "--rank", "2", "--fisher"]) == 0


# ----------------------------------------------------------------------------------------------- extract
@pytest.fixture(scope="module")
def sd3_merged(sd3_adapters, tiny_sd35m, tmp_path_factory):
    from sdlora.commands.export import run_export

    return run_export(sd3_adapters[0], "merged-diffusers", tmp_path_factory.mktemp("sd3_merged") / "merged",
                      base=str(tiny_sd35m), report=quiet)


def test_sd3_extract_from_a_merged_folder_recovers_the_trained_update(sd3_adapters, sd3_merged, tiny_sd35m,
                                                                     tmp_path):
    """Every module whose update is non-zero, the transformer's and both CLIPs', and nothing else."""
    from sdlora.commands.extract import run_extract

    out = tmp_path / "x.safetensors"
    run_extract(tiny_sd35m, sd3_merged, out, 4, report=quiet)
    trained = {n: dw for n, dw in _dense(sd3_adapters[0]).items() if float(dw.norm()) > 0}
    written = load_adapter(out)
    assert set(written.modules) == set(trained)
    assert {n.split(".")[0] for n in trained} == {"transformer", "text_encoder", "text_encoder_2"}
    for n, dw in trained.items():
        # W_tuned = fl32(W0 + ΔW): the difference carries fp32 rounding of W0, far below 1e-4·|ΔW|
        assert float((written.modules[n].delta_weight().double() - dw).norm()) <= 1e-4 * float(dw.norm()), n
    assert adapter_family(written)[0] is SD35M


def test_sd3_extract_from_a_merged_single_file_recovers_the_trained_update(sd3_adapters, tiny_sd35m, tmp_path):
    """--tuned a single file in Stability's layout (sdlora's merged-single-file export; the tiny model's sizes need
    --config-dir, as any non-standard size does)."""
    from sdlora.commands.export import run_export
    from sdlora.commands.extract import run_extract

    single = run_export(sd3_adapters[0], "merged-single-file", tmp_path / "merged.safetensors", base=str(tiny_sd35m),
                        report=quiet)
    extracted, _ = run_extract(tiny_sd35m, single, tmp_path / "x.safetensors", 4, config_dir=str(tiny_sd35m),
                               report=quiet)
    trained = {n: dw for n, dw in _dense(sd3_adapters[0]).items() if float(dw.norm()) > 0}
    assert set(extracted.modules) == set(trained)
    for n, dw in trained.items():
        assert float((extracted.modules[n].delta_weight().double() - dw).norm()) <= 1e-4 * float(dw.norm()), n


def test_sd3_extract_refuses_conv_in_one_line(sd3_merged, tiny_sd35m, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    assert main(["extract", "--base", str(tiny_sd35m), "--tuned", str(sd3_merged), "--rank", "2", "--out", str(out),
                 "--conv"]) == 2
    err = capsys.readouterr().err.strip()
    assert "transformer has no convolutions" in err and "\n" not in err and not out.exists()


def test_sd3_extract_finds_t5s_modules_when_t5_was_trained(tiny_sd3, shapes_data, tmp_path):
    """T5 trained on request (text_encoder.train_parts): its q/k/v/o updates come back from the merged folder."""
    from sdlora.commands.export import run_export
    from sdlora.commands.extract import run_extract
    from sdlora.config import validate

    cfg = validate({"model": {"path": str(tiny_sd3)}, "data": {"path": str(shapes_data), "resolution": 64},
                    "output": {"dir": str(tmp_path / "run")}, "train": {"max_steps": 2, "batch_size": 2},
                    "optim": {"lr": 2e-2}, "lora": {"rank": 2}, "log": {"tracker": "none"},
                    "text_encoder": {"train": True, "train_parts": ["text_encoder_3"], "t5_max_length": T5_LEN}})
    adapter = train(cfg, log=quiet).adapter_path
    merged = run_export(adapter, "merged-diffusers", tmp_path / "merged", base=str(tiny_sd3), report=quiet)
    extracted, _ = run_extract(tiny_sd3, merged, tmp_path / "x.safetensors", 2, report=quiet)
    trained = {n: dw for n, dw in _dense(adapter).items() if float(dw.norm()) > 0}
    assert any(n.startswith("text_encoder_3.") for n in trained) and set(extracted.modules) == set(trained)
    for n, dw in trained.items():
        assert float((extracted.modules[n].delta_weight().double() - dw).norm()) <= 1e-4 * float(dw.norm()), n


def test_sd3_dora_merges_by_svd_with_the_base_and_concat_refuses_it(tiny_sd35m, shapes_data, tmp_path, capsys):
    """A DoRA's update depends on W0: `merge --method svd --base` combines each module's dense update, at full rank
    exactly (the file with itself at 0.5 0.5 is its own update); concat refuses it in one line."""
    from sdlora.adapter.algebra import component_module
    from sdlora.config import validate

    cfg = validate({"model": {"path": str(tiny_sd35m)}, "data": {"path": str(shapes_data), "resolution": 64},
                    "output": {"dir": str(tmp_path / "run")}, "train": {"max_steps": 2, "batch_size": 2},
                    "optim": {"lr": 2e-2}, "lora": {"rank": 2, "type": "dora"}, "log": {"tracker": "none"},
                    "text_encoder": {"t5_max_length": T5_LEN}})
    dora = str(train(cfg, log=quiet).adapter_path)
    out = tmp_path / "m.safetensors"
    assert main(["merge", dora, dora, "--out", str(out)]) == 2
    assert "is a DoRA" in capsys.readouterr().err
    assert main(["merge", dora, dora, "--out", str(out), "--weights", "0.5", "0.5", "--method", "svd", "--rank",
                 "1000", "--base", str(tiny_sd35m)]) == 0
    models = load_components(str(tiny_sd35m)).adaptable()
    written = load_adapter(out)
    for n, m in load_adapter(dora).modules.items():
        dw = m.delta_weight(component_module(models, n).weight.detach()).double()
        got = written.modules[n].delta_weight().double()
        assert float((got - dw).norm()) <= 1e-5 * float(dw.norm()), n
    assert adapter_family(written)[0] is SD35M


@pytest.mark.parametrize("command", ["merge", "resize", "extract"])
def test_sd3_toolbox_outputs_in_the_kohya_layout_read_back_as_the_diffusers_layout(sd3_adapters, sd3_merged,
                                                                                     tiny_sd35m, tmp_path, command):
    """`--layout kohya` writes kohya's MMDiT names (q/k/v fused); sdlora reads each module's update back as the
    diffusers-layout output of the same command has it (fp32 rounding of the fused factors: 1e-6 of |ΔW|)."""
    a, b = (str(p) for p in sd3_adapters)
    args = {"merge": ["merge", a, b, "--weights", "1", "0.5"], "resize": ["resize", a, "--rank", "2"],
            "extract": ["extract", "--base", str(tiny_sd35m), "--tuned", str(sd3_merged), "--rank", "4"]}[command]
    outs = {layout: tmp_path / f"{layout}.safetensors" for layout in ("diffusers", "kohya")}
    for layout, out in outs.items():
        assert main([*args, "--out", str(out), "--layout", layout]) == 0
    from safetensors import safe_open

    with safe_open(str(outs["kohya"]), "pt") as f:
        assert any(k.startswith("lora_unet_joint_blocks_0_x_block_attn_qkv.") for k in f.keys())
    native, kohya = load_adapter(outs["diffusers"]), load_adapter(outs["kohya"])
    assert adapter_family(kohya)[0] is SD35M
    for n, m in native.modules.items():
        dw = m.delta_weight().double()
        if float(dw.norm()) == 0:
            continue
        assert float((kohya.modules[n].delta_weight().double() - dw).norm()) <= 1e-6 * float(dw.norm()), n


# ------------------------------------------------------------------------------ init_from, init_alphas_from
def test_sd3_init_from_starts_at_the_files_update_and_init_alphas_from_takes_its_alphas(sd3_adapters, tiny_sd35m,
                                                                                       shapes_data, tmp_path):
    from sdlora.config import validate
    from sdlora.lora import inject_all

    a, _ = sd3_adapters
    file_modules = load_adapter(a).modules

    def config(**lora):
        return validate({"model": {"path": str(tiny_sd35m)}, "data": {"path": str(shapes_data), "resolution": 64},
                         "output": {"dir": str(tmp_path / "run")}, "log": {"tracker": "none"},
                         "text_encoder": {"train": True, "t5_max_length": T5_LEN},
                         "lora": {"rank": 2, "alpha": 1, "learnable_alpha": True, **lora}})

    comps = load_components(str(tiny_sd35m))
    layers = inject_all(comps.adaptable(), config(init_from=str(a)), comps.family)
    assert set(file_modules) <= set(layers)
    for n, m in file_modules.items():
        assert layers[n].rank == m.rank and abs(float(layers[n].alpha.detach()) - m.alpha) <= 1e-6 * abs(m.alpha), n
    for model in comps.adaptable().values():
        model.eval()
    comps.tokenizers_by_part["text_encoder_3"].model_max_length = T5_LEN
    ours = _outputs(comps.denoiser, list(comps.text_encoders.values()), comps.tokenizers, comps.family)
    reference = _reference(tiny_sd35m, {n: m.delta_weight().double() for n, m in file_modules.items()})
    for key, ref in reference.items():
        assert torch.allclose(ours[key], ref, rtol=0, atol=1e-5 * float(ref.abs().max())), key

    alphas = {n: m.alpha for n, m in file_modules.items()}
    assert len(set(alphas.values())) > 1  # learned: the modules' alphas differ
    comps = load_components(str(tiny_sd35m))
    layers = inject_all(comps.adaptable(), config(init_alphas_from=str(a)), comps.family)
    assert set(layers) == set(alphas)
    for n, alpha in alphas.items():
        assert layers[n].rank == 2 and abs(float(layers[n].alpha.detach()) - alpha) <= 1e-6 * abs(alpha), n


# ------------------------------------------------------------------------------------------------ Fisher
def test_sd3_fisher_data_on_the_runs_folder_equals_the_stored_estimate(sd3_adapters, tiny_sd35m, shapes_data):
    """--fisher-data on the run's own folder (its seed, sample count, loss and T5 length, read from the run record)
    gives the estimate stored at training: the same draws and examples, 1e-5 relative (summation order)."""
    from sdlora.training.fisher import fisher_from_data

    a, _ = sd3_adapters
    adapter = load_adapter(a)
    stored = RowFisher.from_metadata(adapter.metadata)
    again = fisher_from_data(adapter, str(tiny_sd35m), str(shapes_data), samples=2)
    assert {n.split(".")[0] for n in stored.modules} == {"transformer", "text_encoder", "text_encoder_2"}
    floor = 1e-6 * max(float(f.double().norm()) for f in stored.modules.values())
    for n, f in stored.modules.items():
        assert float((again.modules[n].double() - f.double()).norm()) <= 1e-5 * max(float(f.double().norm()), floor), n


def test_sd3_without_t5_estimates_the_fisher_from_prompts_and_folders(tiny_sd3_no_t5, shapes_data, tmp_path):
    from sdlora.config import validate
    from sdlora.training.fisher import fisher_from_data

    cfg = validate({"model": {"path": str(tiny_sd3_no_t5)}, "data": {"path": str(shapes_data), "resolution": 64},
                    "output": {"dir": str(tmp_path / "run")}, "train": {"max_steps": 1, "batch_size": 2},
                    "lora": {"rank": 2}, "log": {"tracker": "none"}, "text_encoder": {"t5_max_length": T5_LEN}})
    adapter = load_adapter(train(cfg, log=quiet).adapter_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    for source in (shapes_data, prompts):
        f = fisher_from_data(adapter, str(tiny_sd3_no_t5), str(source), samples=1)
        assert set(f.modules) == set(adapter.modules)
        assert all(bool(torch.isfinite(v).all()) for v in f.modules.values())
        assert sum(float(v.sum()) for v in f.modules.values()) > 0


# ------------------------------------------------------------------------------------ family of a foreign file
def test_an_sd3_adapter_without_a_run_record_is_known_by_its_modules_and_metadata():
    from sdlora.adapter.weights import AdapterWeights, ModuleDelta

    def adapter(names, meta=None, width=32):
        return AdapterWeights({n: ModuleDelta(torch.zeros(1, width), torch.zeros(width, 1)) for n in names}, meta or {})

    mmdit = ["transformer.transformer_blocks.0.attn.to_q", "text_encoder_2.encoder.layers.0.self_attn.q_proj"]
    assert adapter_family(adapter(mmdit))[0] is SD3  # diffusers' own SD3 LoRA file: no metadata
    assert adapter_family(adapter(mmdit + ["transformer.transformer_blocks.0.attn2.to_q"]))[0] is SD35M
    assert adapter_family(adapter(mmdit, width=2432))[0] is SD35L
    assert adapter_family(adapter(mmdit, {"modelspec.architecture": "stable-diffusion-3-5-large/lora"}))[0] is SD35L
    clips = ["text_encoder.encoder.layers.0.self_attn.q_proj", "text_encoder_2.encoder.layers.0.self_attn.q_proj"]
    assert adapter_family(adapter(clips, {"ss_base_model_version": SD35M.kohya_version}))[0] is SD35M
    assert adapter_family(adapter(clips))[0] is SDXL  # CLIP-only and unlabelled: SDXL, as before


# ------------------------------------------------------------------------------------------------ inspect
def test_sd3_inspect_reports_joint_blocks_and_each_text_outputs_drift(sd3_adapters, tiny_sd35m, capsys):
    assert main(["inspect", str(sd3_adapters[0]), "--base", str(tiny_sd35m)]) == 0
    out = capsys.readouterr().out
    groups = [line.split()[0] for line in out.splitlines()
              if line.startswith(("transformer.joint_blocks.", "text_encoder"))]
    assert {"transformer.joint_blocks.0", "transformer.joint_blocks.2", "text_encoder.layers.0",
            "text_encoder_2.layers.0"} <= set(groups)
    for output in ("text_encoder", "text_encoder_2", "pooled_l"):
        assert f"text-embedding drift ({output})" in out, output
