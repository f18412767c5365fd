"""The data pipeline: sources, buckets, caption transforms, deterministic batches, latent caches."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from sdlora.config import SubsetConfig, validate
from sdlora.data import build_training_data
from sdlora.data.captions import transform_caption
from sdlora.errors import UserError
from sdlora.model.loading import load_components
from sdlora.training.loop import train

TOL = 1e-5  # fp32, same VAE, encoded in different batch compositions


def write_image(path, size=(64, 64), seed=0, caption=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def config(tiny_model, tmp_path, data, **sections):
    d = {"model": {"path": str(tiny_model)}, "data": {"resolution": 64, **data},
         "output": {"dir": str(tmp_path / "run")}, "train": {"max_steps": 2, "batch_size": 2, "seed": 0},
         "optim": {"lr": 1e-3, "max_grad_norm": None}, "lora": {"rank": 4, "alpha": 4}, "log": {"tracker": "none"}}
    for k, v in sections.items():
        d[k] = {**d.get(k, {}), **v}
    return validate(d)


@pytest.fixture(scope="module")
def comps(tiny_model):
    return load_components(str(tiny_model))


def items(data):
    return sorted((s.item.path.name, s.item.caption, s.item.repeats, s.item.loss_weight) for s in data.samples)


def quiet(*a, **k):
    pass


# ------------------------------------------------------------------------------------------- sources
def test_plain_folder_pairs_images_with_same_name_captions(tmp_path, tiny_model, comps):
    write_image(tmp_path / "d" / "a.png", caption="a red cube")
    write_image(tmp_path / "d" / "b.jpg", seed=1)
    (tmp_path / "d" / "b.caption").write_text("a blue ball")
    cfg = config(tiny_model, tmp_path, {"path": str(tmp_path / "d")})
    assert items(build_training_data(cfg, comps, say=quiet)) == [("a.png", "a red cube", 1, 1.0)]  # b: no .txt

    cfg = config(tiny_model, tmp_path, {"subsets": [{"path": str(tmp_path / "d"), "caption_extension": ".caption",
                                                     "repeats": 3, "class_caption": "thing"}]})
    assert items(build_training_data(cfg, comps, say=quiet)) == [("a.png", "thing", 3, 1.0), ("b.jpg", "a blue ball", 3, 1.0)]


def test_kohya_tree_takes_repeats_from_the_prefix_and_the_name_as_missing_caption(tmp_path, tiny_model, comps):
    root = tmp_path / "kohya"
    write_image(root / "10_sks dog" / "x.png", caption="sks dog on grass")
    write_image(root / "10_sks dog" / "y.png", seed=1)
    write_image(root / "2_dog" / "z.png", seed=2)
    write_image(root / "notes" / "ignored.png", seed=3)  # not <repeats>_<name>: not a source
    cfg = config(tiny_model, tmp_path, {"path": str(root)})
    assert items(build_training_data(cfg, comps, say=quiet)) == [
        ("x.png", "sks dog on grass", 10, 1.0), ("y.png", "sks dog", 10, 1.0), ("z.png", "dog", 2, 1.0)]


def test_metadata_jsonl_gives_file_name_and_text(tmp_path, tiny_model, comps):
    root = tmp_path / "hf"
    write_image(root / "images" / "one.png")
    write_image(root / "images" / "two.png", seed=1)
    write_image(root / "unlisted.png", seed=2)
    rows = [{"file_name": "images/one.png", "text": "first"}, {"file_name": "images/two.png", "text": "second"}]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = config(tiny_model, tmp_path, {"subsets": [{"path": str(root), "repeats": 2}]})
    assert items(build_training_data(cfg, comps, say=quiet)) == [("one.png", "first", 2, 1.0), ("two.png", "second", 2, 1.0)]


def test_regularisation_subset_items_carry_the_prior_loss_weight(tmp_path, tiny_model, comps):
    write_image(tmp_path / "inst" / "a.png", caption="sks dog")
    write_image(tmp_path / "reg" / "b.png", seed=1)
    cfg = config(tiny_model, tmp_path, {"prior_loss_weight": 0.25, "subsets": [
        {"path": str(tmp_path / "inst")}, {"path": str(tmp_path / "reg"), "is_regularization": True, "class_caption": "dog"}]},
        train={"batch_size": 1})
    data = build_training_data(cfg, comps, say=quiet)
    assert items(data) == [("a.png", "sks dog", 1, 1.0), ("b.png", "dog", 1, 0.25)]
    stream = data.batches()
    weights = {b["captions"][0]: float(b["loss_weight"][0]) for b in (next(stream) for _ in range(2))}
    assert weights == {"sks dog": 1.0, "dog": 0.25}


def test_kohya_and_metadata_trees_train(tmp_path, tiny_model):
    write_image(tmp_path / "k" / "3_red" / "a.png", caption="red")
    write_image(tmp_path / "k" / "1_blue" / "b.png", seed=1)
    write_image(tmp_path / "m" / "c.png", seed=2)
    (tmp_path / "m" / "metadata.jsonl").write_text(json.dumps({"file_name": "c.png", "text": "green"}) + "\n")
    for name in ("k", "m"):
        cfg = config(tiny_model, tmp_path / name, {"path": str(tmp_path / name)})
        result = train(cfg, log=quiet)
        assert result.step == 2 and result.adapter_path.is_file() and all(np.isfinite(result.losses))


def test_subsets_take_caption_options_they_do_not_set_from_data(tmp_path):
    cfg = config("m", tmp_path, {"prefix": "p, ", "shuffle_tags": True,
                                 "subsets": [{"path": "a"}, {"path": "b", "prefix": "", "caption_extension": ".caption"}]})
    a, b = cfg.data_subsets()
    assert (a.prefix, a.shuffle_tags, a.caption_extension) == ("p, ", True, ".txt")
    assert (b.prefix, b.shuffle_tags, b.caption_extension) == ("", True, ".caption")


# ------------------------------------------------------------------------------------------- buckets
SIZES = [(200, 100), (100, 200), (150, 150), (300, 90), (96, 130), (128, 128), (400, 200), (90, 300), (1000, 100), (700, 50)]


def varied_folder(root):
    for i, size in enumerate(SIZES):
        write_image(root / f"{i}.png", size=size, seed=i, caption=f"img {i}")
    return root


def test_every_batch_shares_one_bucket_within_the_area_budget(tmp_path, tiny_model, comps):
    lines = []
    cfg = config(tiny_model, tmp_path, {"path": str(varied_folder(tmp_path / "v")), "resolution": 128,
                                        "bucket_step": 32, "min_side": 64, "max_side": 256}, train={"batch_size": 2})
    data = build_training_data(cfg, comps, say=lines.append)
    buckets = {s.geo.bucket for s in data.samples}
    assert len(buckets) >= 3, buckets  # the aspect ratios really differ
    assert all(w * h <= 128 * 128 and w % 32 == 0 and h % 32 == 0 and 64 <= min(w, h) and max(w, h) <= 256
               for w, h in buckets)
    stream = data.batches()
    for _ in range(3 * data.batches_per_epoch()):
        batch = next(stream)
        assert batch["pixel_values"].shape[0] == 2
        assert -1.0 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1.0
        names = [p.rsplit("/", 1)[-1] for p in batch["image_paths"]]
        sizes = {data.samples[[s.item.path.name for s in data.samples].index(n)].geo.bucket for n in names}
        assert len(sizes) == 1 and batch["pixel_values"].shape[2:] == (next(iter(sizes))[1], next(iter(sizes))[0])
    table = "\n".join(lines)
    assert "buckets" in table and all(f"{w} x {h}" in table for w, h in buckets)


def test_no_upscale_puts_each_image_in_a_bucket_no_larger_than_itself(tmp_path, tiny_model, comps):
    cfg = config(tiny_model, tmp_path, {"path": str(varied_folder(tmp_path / "v")), "resolution": 256,
                                        "bucket_step": 32, "min_side": 64, "max_side": 512, "no_upscale": True,
                                        "min_image_side": 32})
    data = build_training_data(cfg, comps, say=quiet)
    for s in data.samples:
        (bw, bh), (w, h) = s.geo.bucket, s.size
        assert bw <= w and bh <= h and bw * bh <= 256 * 256 and max(bw, bh) <= 512, (s.size, s.geo)
    assert (700, 50) in {s.size for s in data.samples}  # smaller than every bucket: its own, shrunk to max_side
    cfg = config(tiny_model, tmp_path, {"path": str(tmp_path / "v"), "resolution": 256, "bucket_step": 32, "min_side": 64})
    upscaled = [s for s in build_training_data(cfg, comps, say=quiet).samples if s.geo.bucket[0] > s.size[0]]
    assert upscaled  # without the option the same images do get enlarged: the check above can fail


# ------------------------------------------------------------------------------------------- captions
def caption_opts(**kw):
    return SubsetConfig(path="d", **kw)


def test_shuffle_keeps_the_first_keep_tokens_in_front_and_is_seeded():
    opts = caption_opts(shuffle_tags=True, keep_tokens=2, prefix="<", suffix=">")
    caption = "sks, dog, a, b, c, d, e, f"
    outs = [transform_caption(caption, opts, np.random.default_rng(i)) for i in range(20)]
    for out in outs:
        assert out.startswith("<sks, dog, ") and out.endswith(">")
        assert sorted(out[1:-1].split(", ")) == sorted(caption.split(", "))
    assert len(set(outs)) > 10  # it does shuffle
    assert outs == [transform_caption(caption, opts, np.random.default_rng(i)) for i in range(20)]  # seeded


def test_caption_and_tag_dropout_rates():
    n = 2000
    dropped = sum(transform_caption("a, b", caption_opts(caption_dropout=0.3), np.random.default_rng(i)) == ""
                  for i in range(n))
    assert abs(dropped / n - 0.3) < 0.04
    opts = caption_opts(tag_dropout=0.5, keep_tokens=1)
    outs = [transform_caption("keep, " + ", ".join(map(str, range(10))), opts, np.random.default_rng(i)) for i in range(200)]
    assert all(o.startswith("keep") for o in outs)
    kept = np.mean([len(o.split(", ")) - 1 for o in outs])
    assert abs(kept - 5) < 0.5
    assert transform_caption("x,  y", caption_opts(), np.random.default_rng(0)) == "x,  y"  # no options: untouched


def test_captions_longer_than_75_tokens_are_counted(tmp_path, tiny_model, comps):
    write_image(tmp_path / "d" / "a.png", caption=" ".join(["word"] * 100))
    write_image(tmp_path / "d" / "b.png", seed=1, caption="short")
    lines = []
    build_training_data(config(tiny_model, tmp_path, {"path": str(tmp_path / "d")}), comps, say=lines.append)
    assert any("1 of 2 captions are longer than the text encoder's 75 tokens" in line for line in lines), lines


# ----------------------------------------------------------------------------------- order and state
def stream(data, n):
    it = data.batches()
    return [next(it) for _ in range(n)]


def same(a, b):
    return a["captions"] == b["captions"] and torch.equal(a["pixel_values"], b["pixel_values"])


def test_resuming_from_state_dict_reproduces_the_uninterrupted_stream(tmp_path, tiny_model, comps, shapes_data):
    cfg = config(tiny_model, tmp_path, {"path": str(shapes_data), "flip": True, "crop": "random", "shuffle_tags": True},
                 train={"batch_size": 3, "seed": 5})
    full = stream(build_training_data(cfg, comps, say=quiet), 7)  # 8 images / 3: epochs of 3 batches
    first = build_training_data(cfg, comps, say=quiet)
    it = first.batches()
    for _ in range(4):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))
    assert state == {"epoch": 1, "index": 1}
    resumed = build_training_data(cfg, comps, say=quiet)
    resumed.load_state_dict(state)
    assert all(same(a, b) for a, b in zip(full[4:], stream(resumed, 3)))
    assert not same(full[0], full[3])  # a new epoch reshuffles


def test_two_processes_see_what_one_process_with_twice_the_batch_sees(tmp_path, tiny_model, comps, shapes_data):
    data_cfg = {"path": str(shapes_data), "flip": True, "crop": "random", "tag_dropout": 0.3}
    one = stream(build_training_data(config(tiny_model, tmp_path, data_cfg, train={"batch_size": 2}), comps, say=quiet), 5)
    cfg = config(tiny_model, tmp_path, data_cfg, train={"batch_size": 1})
    ranks = [stream(build_training_data(cfg, comps, num_processes=2, process_index=r, say=quiet), 5) for r in (0, 1)]
    for k in range(5):
        assert one[k]["captions"] == ranks[0][k]["captions"] + ranks[1][k]["captions"]
        assert torch.equal(one[k]["pixel_values"], torch.cat([ranks[0][k]["pixel_values"], ranks[1][k]["pixel_values"]]))


def test_worker_processes_change_nothing(tmp_path, tiny_model, comps, shapes_data):
    data_cfg = {"path": str(shapes_data), "flip": True, "crop": "random"}
    plain = stream(build_training_data(config(tiny_model, tmp_path, data_cfg), comps, say=quiet), 5)
    workers = build_training_data(config(tiny_model, tmp_path, {**data_cfg, "num_workers": 1}), comps, say=quiet)
    it = workers.batches()
    got = [next(it) for _ in range(5)]
    assert all(same(a, b) for a, b in zip(plain, got))
    assert workers.state_dict() == {"epoch": 1, "index": 1}  # consumed, not prefetched


# ------------------------------------------------------------------------------------------- caching
def test_disk_cache_second_run_encodes_nothing_and_a_changed_image_only_itself(tmp_path, tiny_model, comps, shapes_data):
    import shutil

    folder = shutil.copytree(shapes_data, tmp_path / "d")
    cfg = config(tiny_model, tmp_path, {"path": str(folder), "cache_latents": "disk", "flip": True,
                                        "cache_dir": str(tmp_path / "cache")})
    assert build_training_data(cfg, comps, say=quiet).vae_encodes == 16  # 8 images x both orientations
    again = build_training_data(cfg, comps, say=quiet)
    assert again.vae_encodes == 0 and again.cache_hits == 16
    for b in stream(again, 8):
        again.latent_distribution(b, comps.vae)
    assert again.vae_encodes == 0
    write_image(folder / "003.png", seed=99)
    assert build_training_data(cfg, comps, say=quiet).vae_encodes == 2


def test_cached_latents_equal_fresh_encodes_of_the_same_batch(tmp_path, tiny_model, comps, shapes_data):
    data_cfg = {"path": str(shapes_data), "flip": True}
    fresh = build_training_data(config(tiny_model, tmp_path, data_cfg), comps, say=quiet)
    cached = build_training_data(config(tiny_model, tmp_path, {**data_cfg, "cache_latents": "memory"}), comps, say=quiet)
    for a, b in zip(stream(fresh, 6), stream(cached, 6)):
        assert "pixel_values" not in b and a["captions"] == b["captions"]
        for x, y in zip(fresh.latent_distribution(a, comps.vae), cached.latent_distribution(b, comps.vae)):
            assert float((x - y).abs().max()) <= TOL
    assert fresh.vae_encodes == 12 and cached.vae_encodes == 16


def test_training_with_and_without_the_cache_gives_the_same_losses(tmp_path, tiny_model, shapes_data):
    losses = [train(config(tiny_model, tmp_path / mode, {"path": str(shapes_data), "cache_latents": mode, "flip": True,
                                                         "cache_dir": str(tmp_path / "c")}, train={"max_steps": 3}),
                    log=quiet).losses for mode in ("none", "disk")]
    assert np.allclose(losses[0], losses[1], rtol=1e-4, atol=1e-6), losses


def test_random_crop_with_a_latent_cache_is_a_config_error(tmp_path, tiny_model, shapes_data):
    # A config-only rule: it fails at validation, before any model loads.
    with pytest.raises(UserError, match="data.crop=random cannot be combined with data.cache_latents"):
        config(tiny_model, tmp_path, {"path": str(shapes_data), "crop": "random", "cache_latents": "memory"})


TWO_PROCESS_SCRIPT = """
import sys, torch.distributed as dist
from sdlora.config import validate
from sdlora.data import build_training_data
from sdlora.model.loading import load_components
dist.init_process_group("gloo")
model, images, cache = sys.argv[1:4]
cfg = validate({"model": {"path": model}, "output": {"dir": cache + "/run"}, "train": {"batch_size": 1},
                "data": {"path": images, "resolution": 64, "cache_latents": "disk", "flip": True, "cache_dir": cache}})
data = build_training_data(cfg, load_components(model), num_processes=2, process_index=dist.get_rank(), say=lambda *a: None)
print(f"rank {dist.get_rank()} encoded {data.vae_encodes} hits {data.cache_hits}", flush=True)
dist.destroy_process_group()
"""


def test_two_processes_share_the_disk_cache_fill(tmp_path, tiny_model, shapes_data):
    script = tmp_path / "fill.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), str(tiny_model),
           str(shapes_data), str(tmp_path / "cache")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for encoded in (8, 0):  # 16 entries (8 images x 2 flips) split 8/8, then all found; each reads all 16
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        # the two processes share stdout: lines may run together
        got = sorted(re.findall(r"rank (\d) encoded (\d+) hits (\d+)", proc.stdout))
        assert got == [("0", str(encoded), "16"), ("1", str(encoded), "16")], proc.stdout
