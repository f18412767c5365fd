"""Masked loss (data.masked_loss): masks follow their image through bucketing, crop and flip, are cached with
the latents, and weight the diffusion loss in latent space; an image without a mask weighs 1."""

import numpy as np
import pytest
import torch
from PIL import Image

from sdlora.data.pipeline import build_training_data
from sdlora.errors import UserError
from sdlora.model.loading import load_components
from sdlora.training.losses import diffusion_loss
from sdlora.training.loop import train
from sdlora.training.preflight import before_model

LATENT = 8  # 64-pixel buckets and the tiny VAE's downscale factor of 8


@pytest.fixture
def masked_data(tmp_path):
    """alpha.png: 64x64 RGBA, opaque on the left half. wide.png: 128x64 RGB whose mask file (in masks/) is white on
    x in [32, 64): the left half of its centre crop [32, 96). plain.png: no mask."""
    folder, masks = tmp_path / "data", tmp_path / "masks"
    folder.mkdir(), masks.mkdir()
    rgba = np.full((64, 64, 4), 200, np.uint8)
    rgba[:, :, 3] = 0
    rgba[:, :32, 3] = 255
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    Image.fromarray(np.full((64, 128, 3), 90, np.uint8)).save(folder / "wide.png")
    mask = np.zeros((64, 128), np.uint8)
    mask[:, 32:64] = 255
    Image.fromarray(mask, "L").save(masks / "wide.png")
    Image.fromarray(np.full((64, 64, 3), 30, np.uint8)).save(folder / "plain.png")
    for name in ("alpha", "wide", "plain"):
        (folder / f"{name}.txt").write_text(f"a {name} picture")
    return folder, masks


def left_half() -> torch.Tensor:
    m = torch.zeros(1, LATENT, LATENT)
    m[..., : LATENT // 2] = 1.0
    return m


def expected_masks(flip: bool) -> dict[str, torch.Tensor]:
    half = left_half().flip(-1) if flip else left_half()
    return {"alpha": half, "wide": half, "plain": torch.ones(1, LATENT, LATENT)}


def masks_by_image(data) -> dict[str, tuple[torch.Tensor, bool]]:
    got = {}
    for index in range(data.batches_per_epoch(0)):
        slots = data.slots(0, index)
        batch = data.make_batch(slots)
        for slot, path, mask in zip(slots, batch["image_paths"], batch["loss_mask"]):
            got[path.rsplit("/", 1)[1].split(".")[0]] = (mask, slot.flip)
    return got


@pytest.mark.parametrize("cache", ["none", "memory"])
def test_masks_follow_crop_and_flip_and_are_cached_with_the_latents(make_config, tiny_model, masked_data, cache):
    folder, masks = masked_data
    cfg = make_config(data={"path": str(folder), "masked_loss": True, "mask_dir": str(masks), "flip": True,
                            "cache_latents": cache}, train={"batch_size": 1})
    data = build_training_data(cfg, load_components(str(tiny_model)), say=lambda *a: None)
    assert (data.masks is not None) == (cache == "memory")
    got = masks_by_image(data)
    assert sorted(got) == ["alpha", "plain", "wide"]
    for name, (mask, flip) in got.items():
        # 0/1 masks whose edges fall on latent-cell edges: the area mean of each cell is exactly 0 or 1.
        assert torch.equal(mask, expected_masks(flip)[name]), (name, flip)


def test_masked_loss_equals_reference_on_a_synthetic_mask():
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, LATENT, LATENT, generator=gen), torch.randn(3, 4, LATENT, LATENT, generator=gen)
    mask = torch.rand(3, 1, LATENT, LATENT, generator=gen)
    mask[2] = 1.0
    weight = torch.tensor([1.0, 0.5, 2.0])

    class Mse:
        type, huber_delta, huber_scale, min_snr_gamma = "mse", 0.1, 1.0, None

    got = diffusion_loss(pred, target, torch.zeros(3, dtype=torch.long), None, Mse, weight, mask)
    # Reference in float64: every channel of a latent cell weighted by its mask value, mean over all elements.
    p, t, m = pred.double(), target.double(), mask.double()
    per_image = [((p[i] - t[i]) ** 2 * m[i]).sum() / p[i].numel() for i in range(3)]
    reference = sum(w * x for w, x in zip(weight.double(), per_image)) / 3
    # The loss is about 1; fp32 sums of 256 terms err by far under 1e-5 relative on any x86 CPU.
    assert float(got) == pytest.approx(float(reference), rel=1e-5)
    unmasked = diffusion_loss(pred[2:], target[2:], torch.zeros(1, dtype=torch.long), None, Mse, weight[2:])
    masked_by_ones = diffusion_loss(pred[2:], target[2:], torch.zeros(1, dtype=torch.long), None, Mse, weight[2:], mask[2:])
    assert torch.equal(unmasked, masked_by_ones)  # x * 1.0 is x exactly: a mask of ones is no mask


def test_images_without_a_mask_train_exactly_as_unmasked(make_config, tmp_path):
    runs = [train(make_config(train={"max_steps": 3}, data={"masked_loss": on},
                              output={"dir": str(tmp_path / f"run{on}")})).losses for on in (False, True)]
    assert runs[0] == runs[1]


def test_masked_training_runs_and_differs_from_unmasked(make_config, masked_data, tmp_path):
    folder, masks = masked_data
    runs = [train(make_config(train={"max_steps": 2, "batch_size": 1}, data={"path": str(folder), "masked_loss": on,
                                                                            "mask_dir": str(masks) if on else None},
                              output={"dir": str(tmp_path / f"run{on}")})).losses for on in (False, True)]
    assert all(np.isfinite(runs[1])) and runs[0] != runs[1]


def test_mask_dir_needs_masked_loss_and_an_existing_folder(make_config, tmp_path):
    with pytest.raises(UserError, match="data.mask_dir is set but has effect only with data.masked_loss: true"):
        make_config(data={"mask_dir": str(tmp_path)})
    with pytest.raises(UserError, match="data.mask_dir: no such folder"):
        before_model(make_config(data={"masked_loss": True, "mask_dir": str(tmp_path / "nope")}))


# ------------------------------------------------------------------------- the start-up scan (issue 25, item 4)
def quiet_train(cfg):
    lines = []
    train(cfg, log=lines.append)
    return lines


@pytest.mark.parametrize("fault", ["size", "unreadable"])
def test_a_bad_mask_stops_the_run_before_the_first_step(make_config, masked_data, tmp_path, fault):
    folder, masks = masked_data
    if fault == "size":
        Image.fromarray(np.full((32, 32), 255, np.uint8), "L").save(masks / "plain.png")  # plain.png is 64x64
    else:
        (masks / "plain.png").write_bytes(b"not a png")
    cfg = make_config(train={"max_steps": 20, "batch_size": 1},
                      data={"path": str(folder), "masked_loss": True, "mask_dir": str(masks)})
    message = r"plain\.png is 32x32, the image 64x64" if fault == "size" else r"cannot read the loss mask of .*plain\.png"
    with pytest.raises(UserError, match=message):
        quiet_train(cfg)
    # caught in the scan, before the run folder is written (run.begin), not at the step that first drew the image
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_all_black_masks_for_every_image_are_an_error(make_config, masked_data, tmp_path):
    folder, masks = masked_data
    for name in ("alpha", "wide", "plain"):
        size = (128, 64) if name == "wide" else (64, 64)
        Image.fromarray(np.zeros(size[::-1], np.uint8), "L").save(masks / f"{name}.png")
    cfg = make_config(train={"max_steps": 2, "batch_size": 1},
                      data={"path": str(folder), "masked_loss": True, "mask_dir": str(masks)})
    with pytest.raises(UserError, match=r"every image's loss mask is black.*nothing would train"):
        quiet_train(cfg)


@pytest.mark.parametrize("crop", ["center", "random"])
def test_an_all_black_mask_for_some_images_is_a_warning_naming_them(make_config, masked_data, tmp_path, crop):
    folder, masks = masked_data
    Image.fromarray(np.zeros((64, 64), np.uint8), "L").save(masks / "plain.png")
    outside = np.zeros((64, 128), np.uint8)
    outside[:, :32] = 255  # wide.png's centre crop is x in [32, 96): white only where that crop never reaches
    Image.fromarray(outside, "L").save(masks / "wide.png")
    cfg = make_config(train={"max_steps": 1, "batch_size": 1},
                      data={"path": str(folder), "masked_loss": True, "mask_dir": str(masks), "crop": crop})
    lines = quiet_train(cfg)
    warned = [line for line in lines if "black loss mask" in line]
    black = "2 of 3 images" if crop == "center" else "1 of 3 images"  # a random crop can reach wide.png's white part
    assert len(warned) == 1 and black in warned[0] and "plain.png" in warned[0], lines
    assert ("wide.png" in warned[0]) == (crop == "center")


def test_a_mask_dir_matching_no_image_is_a_warning(make_config, masked_data, tmp_path):
    folder, masks = masked_data
    (masks / "wide.png").rename(masks / "wide.jpg.png")  # a naming slip: kohya's rule is cat.jpg -> cat.png
    cfg = make_config(train={"max_steps": 1, "batch_size": 1},
                      data={"path": str(folder), "masked_loss": True, "mask_dir": str(masks)})
    assert any("holds no mask named like any of the 3 images" in line for line in quiet_train(cfg))


def test_a_fully_transparent_image_is_named_like_an_all_black_mask(make_config, masked_data):
    folder, _ = masked_data
    clear = np.full((64, 64, 4), 200, np.uint8)
    clear[:, :, 3] = 0  # its alpha channel is its mask (no data.mask_dir): weight 0 everywhere
    Image.fromarray(clear, "RGBA").save(folder / "alpha.png")
    lines = quiet_train(make_config(train={"max_steps": 1, "batch_size": 1},
                                    data={"path": str(folder), "masked_loss": True}))
    warned = [line for line in lines if "black loss mask" in line]
    assert len(warned) == 1 and "1 of 3 images" in warned[0] and "alpha.png" in warned[0], lines
