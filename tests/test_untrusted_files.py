"""A file someone else made is data: nothing in it may unpickle, choose a path to open, or turn on an option
(issue 25, section 1)."""

import json

import pytest
import torch

import sdlora.training.checkpoint as ckpt
from sdlora.cli import main as cli_main
from sdlora.errors import UserError
from sdlora.training.loop import train
from sdxl_fixtures import tiny_sdxl  # noqa: F401 (fixture)


def quiet(*a, **k):
    pass


class _Planted:
    """Unpickling this writes a file: the proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (_touch, (self.marker,))


def _touch(path):
    with open(path, "w") as f:
        f.write("ran")
    return {}


def _refresh_manifest(folder, step):
    ckpt.write_manifest(folder, step)  # a shared folder's manifest is consistent: the attacker wrote it too
    assert ckpt.verify_checkpoint(folder) is None


@pytest.fixture
def two_step_run(make_config, tmp_path):
    out = tmp_path / "run"
    cfg = make_config({"output": {"dir": str(out)}, "train": {"max_steps": 2, "batch_size": 2},
                       "checkpoint": {"every_steps": 2, "keep_last": 2}})
    train(cfg, log=quiet)
    return cfg, out, out / "checkpoints" / "step_000002"


@pytest.mark.parametrize("name", ["rng_rank0.pt", "optimizer.pt"])
def test_resume_never_unpickles_code_from_a_shared_checkpoint(two_step_run, tmp_path, name):
    cfg, out, folder = two_step_run
    marker = tmp_path / "code_ran"
    torch.save({"state": _Planted(marker)}, folder / name)  # a valid torch file whose pickle calls _touch
    _refresh_manifest(folder, 2)
    with pytest.raises(UserError, match=name.replace(".", r"\.")) as info:
        train(cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 4})}),
              resume=str(folder), log=quiet)
    assert "\n" not in str(info.value)
    assert not marker.exists()  # nothing in the file ran


def test_a_checkpoint_written_by_the_previous_version_still_resumes(two_step_run):
    """sdlora <= this fix saved the RNG state with torch.save (tensors, tuples, ints, a str): it loads without
    unpickling code (weights_only), so old run folders keep resuming."""
    cfg, _, folder = two_step_run  # the save path is unchanged: this folder is what the previous version wrote
    state = torch.load(folder / "rng_rank0.pt", weights_only=True)
    assert set(state) >= {"torch", "python", "numpy"}
    result = train(cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 3})}),
                   resume=str(folder), log=quiet)
    assert result.step == 3


def test_a_manifest_never_makes_resume_read_a_file_outside_its_checkpoint(two_step_run, tmp_path):
    _, out, folder = two_step_run
    secret = tmp_path / "secret.txt"
    secret.write_text("the user's own file\n")
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in (str(secret), "../../../secret.txt"):
        manifest["files"][name] = {"bytes": 0, "sha256": "0" * 64}
        (folder / "manifest.json").write_text(json.dumps(manifest))
        problem = ckpt.verify_checkpoint(folder)
        assert problem is not None and "bytes" not in problem and "SHA-256" not in problem, problem
        del manifest["files"][name]


# ------------------------------------------------------------------ an adapter's run record is a description
def _with_record(src, dst, **model_settings):
    """`src` (an sdlora adapter) rewritten as someone else could: its run record names other paths and options."""
    from sdlora.adapter.io import load_adapter
    from sdlora.adapter.weights import save_native

    adapter = load_adapter(src)
    record = json.loads(adapter.metadata["sdlora.run"])
    for key, value in model_settings.items():
        section, name = key.split("__")
        if section == "record":
            record[name] = value
        else:
            record["config"][section][name] = value
    adapter.metadata["sdlora.run"] = json.dumps(record)
    adapter.metadata["sdlora.config"] = json.dumps(record["config"])
    save_native(adapter, dst)
    return dst


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory, tiny_model, shapes_data):
    from sdlora.config import validate

    out = tmp_path_factory.mktemp("own") / "run"
    train(validate({"model": {"path": str(tiny_model)}, "data": {"path": str(shapes_data), "resolution": 64},
                    "output": {"dir": str(out)}, "train": {"max_steps": 1, "batch_size": 2, "seed": 0},
                    "lora": {"rank": 4, "alpha": 4}, "log": {"tracker": "none"}}), log=quiet)
    return out / "adapter.safetensors"


def test_export_never_unpickles_a_vae_named_by_the_adapters_record(trained_adapter, tiny_model, tmp_path):
    marker = tmp_path / "code_ran"
    evil = tmp_path / "vae.ckpt"
    torch.save({"state_dict": _Planted(marker)}, evil)
    adapter = _with_record(trained_adapter, tmp_path / "downloaded.safetensors", model__vae_path=str(evil),
                           model__allow_pickle=True)
    for fmt in ("merged-diffusers", "merged-single-file"):
        out = tmp_path / f"out-{fmt}"
        code = cli_main(["export", str(adapter), "--format", fmt, "--out", str(out), "--base", str(tiny_model)])
        assert not marker.exists()  # the record's VAE was neither chosen nor unpickled
        assert code == 0


def test_a_runs_own_adapter_exports_with_base_on_a_machine_without_its_training_vae(trained_adapter, tiny_model,
                                                                                   tmp_path):
    adapter = _with_record(trained_adapter, tmp_path / "moved.safetensors",
                           model__vae_path=str(tmp_path / "gone" / "vae"), model__config_dir=str(tmp_path / "gone"),
                           record__base_model=str(tmp_path / "gone" / "model"))
    out = tmp_path / "merged"
    assert cli_main(["export", str(adapter), "--format", "merged-diffusers", "--out", str(out),
                     "--base", str(tiny_model)]) == 0
    assert (out / "model_index.json").is_file()


def test_export_without_base_loads_no_model_the_record_names(trained_adapter, tiny_model, tmp_path, capsys):
    """The record's base model path is a description: a merged export asks for --base instead of opening it."""
    capsys.readouterr()
    assert cli_main(["export", str(trained_adapter), "--format", "merged-diffusers",
                     "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--base" in err and str(tiny_model) in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m").exists()


def test_a_kohya_export_never_reads_caption_files_the_record_names(trained_adapter, tmp_path):
    private = tmp_path / "private"
    private.mkdir()
    (private / "notes.txt").write_text("my bank password, hunter2")
    adapter = _with_record(trained_adapter, tmp_path / "downloaded.safetensors", data__path=str(private),
                           data__caption_extension=".txt")
    out = tmp_path / "kohya.safetensors"
    assert cli_main(["export", str(adapter), "--format", "kohya", "--out", str(out)]) == 0
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert "hunter2" not in json.dumps(meta)


# ------------------------------------------------------------------ a data set's metadata.jsonl names its own files
def test_metadata_jsonl_never_makes_sdlora_read_a_file_outside_its_folder(tmp_path):
    """A downloaded data set's metadata.jsonl picks images by file_name: only files inside its own folder."""
    from sdlora.config import validate
    from sdlora.data.sources import Item, discover

    import numpy as np
    from PIL import Image

    outside = tmp_path / "private.png"
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(outside)
    folder = tmp_path / "downloaded"
    folder.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(folder / "a.png")
    rows = [{"file_name": "a.png", "text": "a dog"}, {"file_name": str(outside), "text": "absolute"},
            {"file_name": "../private.png", "text": "relative"}]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    subsets = validate({"model": {"path": "m"}, "output": {"dir": "o"}, "data": {"path": str(folder)}}).data_subsets()
    entries = discover(subsets, 1.0, [])
    items = [e for e in entries if isinstance(e, Item)]
    assert [e.path.name for e in items] == ["a.png"]
    assert all(e.path.resolve().parent == folder.resolve() for e in entries), entries


def test_a_base_models_scheduler_config_only_ever_names_a_scheduler(trained_adapter, tiny_model, tmp_path, capsys):
    """A downloaded model folder's scheduler_config.json picks a class by name: only a diffusers scheduler may be it."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    config = base / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "_class_name": "StableDiffusionPipeline"}))
    capsys.readouterr()
    code = cli_main(["export", str(trained_adapter), "--format", "merged-diffusers", "--out", str(tmp_path / "m"),
                     "--base", str(base)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "StableDiffusionPipeline" in err and len(err.splitlines()) == 1, err


def test_a_config_folders_model_index_only_ever_names_a_clip_text_encoder(tiny_sdxl, tmp_path):
    """model.config_dir's model_index.json picks the text encoder's class by name (SDXL single files, read through
    diffusers' converters): only the CLIP classes sdlora reads."""
    import shutil

    from sdlora.model.loading import load_components
    from sdlora.model.single_file import save_single_file

    single = tmp_path / "model.safetensors"
    save_single_file(single, load_components(str(tiny_sdxl)))
    configs = tmp_path / "configs"
    shutil.copytree(tiny_sdxl, configs)
    index = json.loads((configs / "model_index.json").read_text())
    (configs / "model_index.json").write_text(json.dumps({**index, "text_encoder": ["transformers", "pipeline"]}))
    with pytest.raises(UserError, match="pipeline") as info:
        load_components(str(single), config_dir=str(configs))
    assert "\n" not in str(info.value)
