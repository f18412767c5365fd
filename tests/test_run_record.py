"""Every export says what was trained: one RunRecord, built by the trainer, read back from each file it writes.

Three runs, each checked in all four export formats (the run's own adapter, `sdlora export` to diffusers,
kohya, a merged diffusers folder and a merged single file): a clip-skip-2 run, a run on an SD 1.x folder
whose scheduler says v_prediction (no model.prediction_type override), and a 64 px run.
"""

import json
import shutil

import pytest
from safetensors import safe_open

from sdlora.commands.export import run_export
from sdlora.adapter.run_record import RunRecord
from sdlora.training.loop import train


@pytest.fixture(scope="module")
def v_model(tiny_model, tmp_path_factory):
    """The tiny SD 1.x model with its scheduler config switched to v_prediction (as SD 1.x v models ship)."""
    folder = tmp_path_factory.mktemp("vpred") / "model"
    shutil.copytree(tiny_model, folder)
    f = folder / "scheduler" / "scheduler_config.json"
    f.write_text(json.dumps(dict(json.loads(f.read_text()), prediction_type="v_prediction")))
    return folder


CASES = {
    "clip_skip_2": ({"text_encoder": {"clip_skip": 2}}, {"clip_skip": 2}),
    "v_prediction_scheduler": ({}, {"prediction_type": "v_prediction"}),
    "64px": ({"data": {"resolution": 64}}, {"resolution": 64}),
}


def _meta(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


@pytest.mark.parametrize("case", list(CASES))
def test_every_export_reads_back_what_was_trained(case, make_config, tiny_model, v_model, tmp_path):
    extra, changed = CASES[case]
    model = v_model if case == "v_prediction_scheduler" else tiny_model
    cfg = make_config(extra, model={"path": str(model)}, train={"max_steps": 1}, output={"dir": str(tmp_path / "run"),
                                                                                         "name": "my_lora"})
    result = train(cfg, log=lambda *_: None)
    expected = {"base_model": str(model), "base_model_version": "sd_v1", "prediction_type": "epsilon",
                "resolution": 64, "clip_skip": 1, "rank": 4, "alpha": 4.0, "init": "zero", "steps": 1,
                "text_encoder_trained": True, "output_name": "my_lora", **changed}
    assert result.components.prediction_type == expected["prediction_type"]  # the target the loss used

    quiet = lambda *_: None  # noqa: E731
    files = {"adapter": result.adapter_path,
             "diffusers": run_export(tmp_path / "run", "diffusers", tmp_path / "d.safetensors", report=quiet),
             "kohya": run_export(tmp_path / "run", "kohya", tmp_path / "k.safetensors", report=quiet),
             "merged-single-file": run_export(tmp_path / "run", "merged-single-file", tmp_path / "m.safetensors",
                                              base=str(model), report=quiet)}
    folder = run_export(tmp_path / "run", "merged-diffusers", tmp_path / "merged", base=str(model), report=quiet)
    records = {k: RunRecord.from_metadata(_meta(p)) for k, p in files.items()}
    records["merged-diffusers"] = RunRecord.from_folder(folder)
    for where, record in records.items():
        got = {k: getattr(record, k) for k in expected}
        assert got == expected, where

    v = expected["prediction_type"] == "v_prediction"
    res = expected["resolution"]
    kohya = _meta(files["kohya"])
    assert kohya["ss_clip_skip"] == str(expected["clip_skip"])
    assert kohya["ss_v_parameterization"] == str(v) and kohya["ss_v2"] == "False"
    assert kohya["ss_resolution"] == f"({res}, {res})" and kohya["ss_steps"] == "1"
    assert kohya["ss_output_name"] == "my_lora" and kohya["ss_network_train_unet_only"] == "False"
    assert kohya["ss_base_model_version"] == "sd_v1" and kohya["ss_sd_model_name"] == model.name
    for where in ("kohya", "merged-single-file"):
        meta = _meta(files[where])
        assert meta["modelspec.prediction_type"] == ("v" if v else "epsilon"), where
        assert meta["modelspec.resolution"] == f"{res}x{res}", where
        assert meta["modelspec.architecture"].startswith("stable-diffusion-v1"), where
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == expected["prediction_type"]  # the merged model predicts what was trained
