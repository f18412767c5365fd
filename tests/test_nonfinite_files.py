"""A file someone else made holding NaN or inf (issue 25, item 4): every command that reads an adapter or a
checkpoint (resize, inspect, extract, merge, export, lora.init_from, lora.init_alphas_from) stops with one line
naming the file and the module, exit 2, instead of a LinAlgError traceback from an SVD or a silent NaN export."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdlora.adapter.run_record import RunRecord
from sdlora.cli import main
from sdlora.config import validate
from sdlora.lora import inject_all
from sdlora.model.loading import load_components
from sdlora.training.export import export_adapter


@pytest.fixture(scope="module")
def poisoned(tiny_model, tmp_path_factory):
    """(a finite adapter, the same adapter with one NaN in one module's B, that module's diffusers key)."""
    root = tmp_path_factory.mktemp("nonfinite")
    cfg = validate({"model": {"path": str(tiny_model)}, "data": {"path": str(root), "resolution": 64},
                    "output": {"dir": str(root / "run")}, "lora": {"rank": 4, "alpha": 4, "learnable_alpha": True},
                    "log": {"tracker": "none"}})
    comps = load_components(cfg.model.path)
    layers = inject_all(comps.adaptable(), cfg, comps.family)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.add_(0.1 * torch.randn(layer.lora_B.shape, generator=g))
    good = root / "good.safetensors"
    export_adapter(layers, good, cfg, RunRecord.from_training(cfg, comps), steps=1)
    tensors = load_file(good)
    key = next(k for k in tensors if "up_blocks" in k and "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    bad = root / "bad.safetensors"
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
    save_file(tensors, bad, metadata=meta)
    return good, bad, key


def one_line_naming(capsys, path, module_part: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert str(path) in err and module_part in err and "non-finite" in err, err
    return err


def module_of(key: str) -> str:
    return key.split(".lora_B")[0].split(".", 1)[1]  # 'unet.up_blocks...to_q.lora_B.weight' -> 'up_blocks...to_q'


@pytest.mark.parametrize("command", [
    ["resize", "{bad}", "--rank", "2", "--out", "{out}"],
    ["resize", "{bad}", "--sv-ratio", "4", "--out", "{out}"],
    ["inspect", "{bad}"],
    ["merge", "{bad}", "{good}", "--out", "{out}"],
    ["merge", "{good}", "{bad}", "--method", "svd", "--rank", "2", "--out", "{out}"],
    ["export", "{bad}", "--format", "kohya", "--out", "{out}"],
])
def test_a_nan_in_an_adapter_is_one_line_naming_file_and_module(poisoned, tmp_path, capsys, command):
    good, bad, key = poisoned
    argv = [a.format(bad=bad, good=good, out=tmp_path / "out.safetensors") for a in command]
    assert main(argv) == 2
    one_line_naming(capsys, bad, module_of(key))
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("key", ["init_from", "init_alphas_from"])
def test_lora_init_from_a_file_holding_nan_is_refused(poisoned, tiny_model, shapes_data, tmp_path, capsys, key):
    _, bad, module_key = poisoned
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{path: {tiny_model}}}\ndata: {{path: {shapes_data}, resolution: 64}}\n"
                   f"output: {{dir: {tmp_path / 'run'}}}\nlog: {{tracker: none}}\n"
                   f"lora: {{rank: 4, alpha: 4, learnable_alpha: true, {key}: {bad}}}\n")
    assert main(["train", "--config", str(cfg), "--dry-run"]) == 2
    one_line_naming(capsys, bad, module_of(module_key))


def test_extract_from_a_fine_tune_holding_nan_names_the_file_and_module(tiny_model, tmp_path, capsys):
    tuned = tmp_path / "tuned"
    shutil.copytree(tiny_model, tuned)
    weights = tuned / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    key = "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert key in tensors, sorted(tensors)[:20]
    tensors[key] = tensors[key] + 0.01  # a real difference, with one NaN in it
    tensors[key][0, 0] = float("nan")
    save_file(tensors, weights)
    assert main(["extract", "--base", str(tiny_model), "--tuned", str(tuned), "--rank", "2",
                 "--out", str(tmp_path / "x.safetensors")]) == 2
    one_line_naming(capsys, tuned, "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")


@pytest.mark.parametrize("part", ["lora_state.safetensors", "ema.safetensors", "optimizer.pt"])
def test_resume_from_a_checkpoint_holding_nan_names_the_checkpoint_and_tensor(make_config, tmp_path, part):
    from sdlora.errors import UserError
    from sdlora.training.checkpoint import write_manifest
    from sdlora.training.loop import train

    run = {"train": {"max_steps": 1, "ema": {"enabled": True}}, "checkpoint": {"every_steps": 1}}
    train(make_config(run), log=lambda *a: None)
    folder = next((tmp_path / "run" / "checkpoints").glob("step_*"))
    if part == "optimizer.pt":
        state = torch.load(folder / part, weights_only=True)
        state["state"][0]["exp_avg"].view(-1)[0] = float("nan")
        torch.save(state, folder / part)
        key = "state.0.exp_avg"
    else:
        state = load_file(folder / part)
        key = next(k for k in state if k.endswith("lora_B"))
        state[key].view(-1)[0] = float("nan")
        save_file(state, folder / part)
    write_manifest(folder, 1)  # a consistent manifest: a shared checkpoint, not a torn save
    with pytest.raises(UserError, match=rf"checkpoint {folder}: .*{key} holds non-finite values"):
        train(make_config(run, train={"max_steps": 2}), resume="latest", log=lambda *a: None)
