"""Several base resolutions in one run (data.resolution: [..], a subset's resolution): each image is bucketed at
each, every batch has one size, the latent cache holds one entry per size, SDXL's size conditioning follows each
batch's size, held-out images leave with every size, and a killed run resumes bit for bit."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from sdlora.cli import main
from sdlora.config import load_config, validate
from sdlora.data import build_training_data
from sdlora.data.buckets import bucket_sizes
from sdlora.data.samples import center_offset
from sdlora.model.loading import load_components
from sdlora.training.loop import train
from sdlora.training.signals import TrainingInterrupted

SIZES = [64, 96]  # with bucket_step 32 each has one bucket: 64x64 (latent 8x8) and 96x96 (latent 12x12)
IMAGE = (80, 64)  # width, height: cropped 8 px a side at 64 (resized 80x64), 12 px at 96 (resized 120x96)
N = 6  # steps of the resume runs


def quiet(*_a, **_k):
    pass


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("multires") / "images"
    root.mkdir()
    for i in range(4):
        arr = np.random.default_rng(i).integers(0, 256, (IMAGE[1], IMAGE[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"picture {i}")
    return root


@pytest.fixture(scope="module")
def comps(tiny_model):
    return load_components(str(tiny_model))


def config_dict(model, folder, out, **data):
    return {"model": {"path": str(model)},
            "data": {"path": str(folder), "resolution": SIZES, "bucket_step": 32, **data},
            "output": {"dir": str(out)}, "train": {"max_steps": N, "batch_size": 2, "seed": 0},
            "optim": {"lr": 1e-3, "scheduler": "linear", "warmup_steps": 2}, "lora": {"rank": 4, "alpha": 4},
            "log": {"tracker": "none"}, "checkpoint": {"every_steps": 2, "keep_last": 2}}


def epoch_batches(data, epoch):
    """The batches of one epoch as the trainer gets them (position set to the epoch's start)."""
    data.load_state_dict({"epoch": epoch, "index": 0})
    stream = data.batches()
    return [next(stream) for _ in range(data.batches_per_epoch(epoch))]


def size_of(batch):
    key = "pixel_values" if "pixel_values" in batch else "latent_mean"
    return tuple(batch[key].shape[-2:])


def test_every_image_trains_at_every_size_once_an_epoch_in_batches_of_one_size(tiny_model, comps, folder, tmp_path):
    cfg = validate(config_dict(tiny_model, folder, tmp_path / "run"))
    said = []
    data = build_training_data(cfg, comps, say=said.append)
    assert "sdlora: 4 images at 2 base resolutions (64, 96), 0 skipped" in said
    assert "\n    64:   64 x 64        4 images\n    96:   96 x 96        4 images" in said[-1], said
    assert len(data.samples) == 4 * len(SIZES)
    assert data.batches_per_epoch(0) == 4  # 4 images x 2 sizes / batch 2: an epoch is every image at every size
    for epoch in (0, 1):
        seen = {}
        for batch in epoch_batches(data, epoch):
            h, w = size_of(batch)  # pixels: stacking would fail on mixed sizes; the SDXL fields say the same
            assert batch["target_size"].tolist() == [[h, w]] * 2
            assert batch["original_size"].tolist() == [[IMAGE[1], IMAGE[0]]] * 2
            left = (IMAGE[0] * h // IMAGE[1] - w) // 2  # the centre crop of the resized image, measured in it
            assert batch["crop_top_left"].tolist() == [[0, left]] * 2
            seen.setdefault((h, w), []).extend(batch["image_paths"])
        assert sorted(seen) == [(64, 64), (96, 96)]
        assert all(sorted(paths) == sorted(str(folder / f"{i}.png") for i in range(4)) for paths in seen.values())
    # Each base resolution has its own table of aspect buckets.
    assert bucket_sizes(cfg.data, 64) == [(64, 64)] and bucket_sizes(cfg.data, 96) == [(96, 96)]
    assert bucket_sizes(validate(config_dict(tiny_model, folder, tmp_path, bucket_step=64)).data, 512) != \
        bucket_sizes(validate(config_dict(tiny_model, folder, tmp_path, bucket_step=64)).data, 768)


def test_a_subset_trains_at_its_own_resolution(tiny_model, comps, folder, tmp_path):
    cfg = validate({**config_dict(tiny_model, folder, tmp_path / "run"),
                    "data": {"subsets": [{"path": str(folder)}, {"path": str(folder), "resolution": 96}],
                             "resolution": 64, "bucket_step": 32}})
    data = build_training_data(cfg, comps, say=quiet)
    assert sorted((s.item.subset, s.geo.bucket) for s in data.samples) == [(0, (64, 64))] * 4 + [(1, (96, 96))] * 4
    assert cfg.top_resolution() == 96  # the samples' default size and the run record's resolution


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_the_latent_cache_holds_one_entry_per_image_and_size(tiny_model, comps, folder, tmp_path, mode):
    cfg = validate(config_dict(tiny_model, folder, tmp_path / "run", cache_latents=mode,
                               cache_dir=str(tmp_path / "cache")))
    data = build_training_data(cfg, comps, say=quiet)
    assert data.vae_encodes == 8 and len(data.latents) == 8
    vae = comps.vae
    for i, sample in enumerate(data.samples):
        mean, _ = data.latents[(i, False)]
        side = sample.resolution // 8
        assert tuple(mean.shape) == (4, side, side)
        pixels = data.pixels(sample, center_offset(sample), False)
        with torch.no_grad():
            direct = vae.encode(pixels[None]).latent_dist.mean[0]
        # fp32, one VAE; the cache encoded in batches of another composition: rounding only
        assert float((direct - mean).abs().max()) <= 1e-5 * float(direct.abs().max())
    if mode == "disk":
        assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 8
        again = build_training_data(cfg, comps, say=quiet)
        assert again.vae_encodes == 0 and again.cache_hits == 8


def test_held_out_images_leave_training_at_every_size(make_config, folder, comps):
    cfg = make_config(data={"path": str(folder), "resolution": SIZES, "bucket_step": 32},
                      validation={"every_steps": 1, "num_images": 1, "timesteps": 1}, train={"max_steps": 2})
    said = []
    result = train(cfg, log=lambda *a, **k: said.append(" ".join(map(str, a))))
    assert result.step == 2
    assert any("validation: 1 held-out images at 2 base resolutions x 1 timesteps" in line for line in said), said
    data = build_training_data(cfg, comps, say=quiet)
    held = {s.item.path for s in data.held_out}
    assert len(held) == 1 and len(data.held_out) == 2  # one image, at both sizes
    assert sorted(s.resolution for s in data.held_out) == SIZES
    assert not held & {s.item.path for s in data.samples}


def _interrupt_at(stop_step):
    def hook(step, loss):
        if step == stop_step:
            os.kill(os.getpid(), signal.SIGINT)
        return loss
    return hook


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-identical: the killed process (OMP_NUM_THREADS=1) reduces in the same order
    yield
    torch.set_num_threads(before)


@pytest.fixture
def trained_sizes(monkeypatch):
    """The (h, w) latent sizes the UNet is called with."""
    from diffusers import UNet2DConditionModel

    sizes, forward = [], UNet2DConditionModel.forward

    def record(self, sample, *a, **k):
        sizes.append(tuple(sample.shape[-2:]))
        return forward(self, sample, *a, **k)

    monkeypatch.setattr(UNet2DConditionModel, "forward", record)
    return sizes


def test_sigint_and_sigkill_resume_bit_identically(tiny_model, folder, tmp_path, one_thread, trained_sizes):
    full = train(validate(config_dict(tiny_model, folder, tmp_path / "full")), log=quiet)
    assert set(trained_sizes) == {(8, 8), (12, 12)}  # the run trained batches of both sizes
    reference = load_file(full.adapter_path)

    def same(out):
        got = load_file(out / "adapter.safetensors")
        return got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in got)

    cut = validate(config_dict(tiny_model, folder, tmp_path / "cut"))
    with pytest.raises(TrainingInterrupted):
        train(cut, fault_hook=_interrupt_at(3), log=quiet)
    train(cut, resume="latest", log=quiet)
    assert same(tmp_path / "cut")

    out = tmp_path / "killed"
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(config_dict(tiny_model, folder, out)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sdlora.cli", "train", "--config", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    t0 = time.monotonic()
    while not (out / "checkpoints" / "step_000004").is_dir():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < 240
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert train(load_config(path), resume="latest", log=quiet).step == N
    assert same(out)


def test_sdxl_time_ids_follow_each_batch_size(folder, tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    from sdlora.model.tiny import make_tiny_sdxl

    model = make_tiny_sdxl(tmp_path / "sdxl", seed=0)
    calls, forward = [], UNet2DConditionModel.forward

    def record(self, sample, timestep, encoder_hidden_states, *a, added_cond_kwargs=None, **k):
        calls.append((tuple(sample.shape[-2:]), added_cond_kwargs["time_ids"].tolist()))
        return forward(self, sample, timestep, encoder_hidden_states, *a, added_cond_kwargs=added_cond_kwargs, **k)

    monkeypatch.setattr(UNet2DConditionModel, "forward", record)
    d = config_dict(model, folder, tmp_path / "run")
    train(validate({**d, "train": {**d["train"], "max_steps": 4}, "checkpoint": {"every_steps": 0}}), log=quiet)
    assert {size for size, _ in calls} == {(8, 8), (12, 12)}
    for (h, w), ids in calls:
        side = h * 8  # pixels
        left = (IMAGE[0] * side // IMAGE[1] - side) // 2
        assert ids == [[IMAGE[1], IMAGE[0], 0, left, side, side]] * len(ids)  # original, crop (top, left), target


def test_an_sd3_run_trains_at_two_sizes(tiny_sd3, folder, tmp_path, monkeypatch):
    from diffusers import SD3Transformer2DModel

    sizes, forward = [], SD3Transformer2DModel.forward

    def record(self, hidden_states, *a, **k):
        sizes.append(tuple(hidden_states.shape[-2:]))
        return forward(self, hidden_states, *a, **k)

    monkeypatch.setattr(SD3Transformer2DModel, "forward", record)
    d = config_dict(tiny_sd3, folder, tmp_path / "run")
    result = train(validate({**d, "train": {**d["train"], "max_steps": 4}, "text_encoder": {"t5_max_length": 8},
                             "checkpoint": {"every_steps": 0}}), log=quiet)
    assert result.step == 4 and set(sizes) == {(8, 8), (12, 12)}


@pytest.mark.parametrize("resolution, message", [
    ([], "data.resolution: an empty list"),
    ([64, 100], "data.resolution: 100 is not a base resolution (allowed: multiples of 8 from 32 to 4096"),
    ([64, 64], "data.resolution: 64 is listed twice"),
    (20, "data.resolution: 20 is not a base resolution"),
    ([64, 96.5], "data.resolution: got [64, 96.5]: give a base resolution (512) or a list of them"),
])
def test_a_bad_resolution_list_is_one_line_and_exit_2(tiny_model, folder, tmp_path, capsys, resolution, message):
    path = tmp_path / "c.yaml"
    d = config_dict(tiny_model, folder, tmp_path / "run")
    path.write_text(yaml.safe_dump({**d, "data": {**d["data"], "resolution": resolution}}))
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run").exists()  # before any training


def test_a_bad_subset_resolution_names_the_subset(tiny_model, folder, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    d = config_dict(tiny_model, folder, tmp_path / "run")
    path.write_text(yaml.safe_dump({**d, "data": {"subsets": [{"path": str(folder), "resolution": [96, 12]}]}}))
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.subsets.0.resolution: 12 is not a base resolution" in err, err


def test_sd3_refuses_a_bucket_side_its_patches_do_not_divide(tiny_sd3, folder, tmp_path, capsys):
    # 72 px = 9 latent cells: SD3's 2x2 patches would drop a row (a shape error mid-step before this check)
    path = tmp_path / "c.yaml"
    d = config_dict(tiny_sd3, folder, tmp_path / "run", resolution=[64, 72], bucket_step=8, bucketing=False)
    path.write_text(yaml.safe_dump({**d, "text_encoder": {"t5_max_length": 8}}))
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "bucket 72x72 (base resolution 72" in err and "not a multiple of 16 pixels" in err, err
    assert not (tmp_path / "run" / "adapter.safetensors").exists()
