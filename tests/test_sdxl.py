"""SDXL on a tiny SDXL model built from diffusers' and transformers' own classes: loading, conditioning as
StableDiffusionXLPipeline computes it, micro-conditioning from the real crop, and exports that diffusers loads."""

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_fixtures import sdxl_config, tiny_sdxl  # noqa: F401  (fixtures)
from outputs import load_sdxl_pipeline, max_abs_diff, sdxl_model_outputs, sdxl_pipeline_outputs
from sdlora.config import validate
from sdlora.errors import UserError
from sdlora.lora import build_param_groups, inject_all
from sdlora.model.families import SDXL, family_of_version
from sdlora.model.loading import load_components
from sdlora.model.text import tokenize
from sdlora.training.loop import train

# fp32 on CPU: trained and reloaded models compute the same sums in the same order; what is left is the
# rounding of the factor product B·A against diffusers' own (1e-7 relative on O(1) outputs).
TOL = 1e-5
INITS = ["zero", "orthogonal", "compensated", "principal"]


# ------------------------------------------------------------------------------------------- loading
def test_a_diffusers_sdxl_folder_loads_as_the_sdxl_family(tiny_sdxl):
    comps = load_components(str(tiny_sdxl))
    assert comps.family is SDXL and comps.base_model_version == "sdxl_base_v1-0"
    assert list(comps.text_encoders) == ["text_encoder", "text_encoder_2"]
    assert type(comps.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    # The second tokenizer pads with "!" (id 0), the first with end-of-text: every position after the caption differs.
    ids1, ids2 = (tokenize(t, ["a photo of a cat"])[0] for t in comps.tokenizers)
    end = int((ids1 == comps.tokenizer.eos_token_id).int().argmax())
    assert torch.equal(ids1[: end + 1], ids2[: end + 1])
    assert (ids1[end + 1:] == comps.tokenizer.eos_token_id).all() and (ids2[end + 1:] == 0).all()
    assert comps.tokenizer_2.convert_ids_to_tokens(0) == "!"


def test_sdxl_names_and_metadata_strings():
    assert SDXL.base_model_version("v_prediction") == "sdxl_base_v1-0"  # kohya: one name, ss_v_parameterization tells
    assert family_of_version("sdxl_base_v1-0") == (SDXL, "epsilon")
    spec = SDXL.modelspec("epsilon", title="t", lora=True)
    assert spec["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora" and spec["modelspec.resolution"] == "1024x1024"
    assert SDXL.kohya_base_fields("v_prediction")["ss_v_parameterization"] == "True"
    assert SDXL.kohya_prefixes == {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


# --------------------------------------------------------------------------------------- conditioning
def test_conditioning_equals_the_sdxl_pipelines_encode_prompt(tiny_sdxl):
    pipe = load_sdxl_pipeline(tiny_sdxl)
    prompts = ["a photo of a red circle", "sks person on a blue background"]
    ids = [tokenize(t, prompts) for t in (pipe.tokenizer, pipe.tokenizer_2)]
    for clip_skip in (1, 2):  # ours: 1 = SDXL's default penultimate layer; diffusers counts from it (None, 1)
        with torch.no_grad():
            ours = SDXL.encode([pipe.text_encoder, pipe.text_encoder_2], ids, clip_skip)
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                                      clip_skip=None if clip_skip == 1 else clip_skip - 1)
        assert ours.hidden.shape[-1] == pipe.unet.config.cross_attention_dim
        assert torch.equal(ours.hidden, embeds) and torch.equal(ours.pooled, pooled)


def reference_size_conditioning(path, batch_pixels_hw):
    """The six numbers recomputed from the image file and the batch's pixel size alone: the image is scaled to
    cover the target (smallest scale), and the crop is what remains."""
    w, h = Image.open(path).size
    th, tw = batch_pixels_hw
    scale = max(tw / w, th / h)
    rw, rh = max(tw, round(w * scale)), max(th, round(h * scale))
    return (h, w), (rw, rh), (th, tw)


def test_micro_conditioning_is_the_real_original_size_and_the_bucketing_crop(tiny_sdxl, tmp_path):
    from sdlora.data import build_training_data

    rng = np.random.default_rng(0)
    folder = tmp_path / "data"
    folder.mkdir()
    sizes = [(200, 120), (120, 220), (160, 160), (260, 140)]  # (w, h): landscape, portrait, square, wide
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a photo")
    cfg = validate({"model": {"path": str(tiny_sdxl)}, "data": {"path": str(folder), "resolution": 64, "crop": "random",
                                                               "flip": True, "bucket_step": 8},
                    "output": {"dir": str(tmp_path / "run")}, "train": {"max_steps": 1, "batch_size": 1, "seed": 3},
                    "log": {"tracker": "none"}})
    comps = load_components(str(tiny_sdxl))
    data = build_training_data(cfg, comps, say=lambda *a: None)
    seen, crops = set(), set()
    batches = data.batches()
    for _ in range(12):
        batch = next(batches)
        path, pixels = batch["image_paths"][0], batch["pixel_values"][0]
        time_ids = SDXL.unet_kwargs(SDXL.encode([comps.text_encoder, comps.text_encoder_2],
                                                [tokenize(t, batch["captions"]) for t in comps.tokenizers]),
                                    batch)["added_cond_kwargs"]["time_ids"][0].tolist()
        original, resized, target = reference_size_conditioning(path, pixels.shape[1:])
        top, left = int(time_ids[2]), int(time_ids[3])
        assert time_ids[:2] == list(original) and time_ids[4:] == list(target), (path, time_ids)
        # The crop numbers say where the pixels the model sees come from: the resized image cut at (top, left),
        # mirrored as a whole when flipped (then `left` counts from the mirrored image's left edge).
        img = Image.open(path).convert("RGB").resize(resized, Image.LANCZOS)
        for flipped in (False, True):
            src = img.transpose(Image.FLIP_LEFT_RIGHT) if flipped else img
            crop = np.asarray(src.crop((left, top, left + target[1], top + target[0])), dtype=np.float32) / 127.5 - 1
            if np.abs(crop - pixels.permute(1, 2, 0).numpy()).max() < 1e-6:
                break
        else:
            raise AssertionError(f"{path}: no crop at (top {top}, left {left}) of the resized image gives the batch's pixels")
        seen.add(path)
        crops.add((path, top, left))
    assert len(seen) == len(sizes) and len(crops) > len(sizes)  # every image, and more than one crop of some


def test_caption_dropout_zeroes_the_conditioning_as_sdxl_was_trained(tiny_sdxl):
    comps = load_components(str(tiny_sdxl))
    captions = ["a photo of a cat", ""]  # caption dropout makes the caption "" (data/captions.py)
    cond = SDXL.encode([comps.text_encoder, comps.text_encoder_2], [tokenize(t, captions) for t in comps.tokenizers])
    sizes = torch.tensor([[512.0, 768.0], [1024.0, 1024.0]])
    batch = {"captions": captions, "original_size": sizes, "crop_top_left": torch.tensor([[0.0, 16.0], [8.0, 0.0]]),
             "target_size": torch.tensor([[512.0, 512.0], [1024.0, 1024.0]])}
    kw = SDXL.unet_kwargs(cond, batch)
    hidden, added = kw["encoder_hidden_states"], kw["added_cond_kwargs"]
    assert torch.equal(hidden[0], cond.hidden[0]) and torch.equal(added["text_embeds"][0], cond.pooled[0])
    assert cond.hidden[1].abs().max() > 0 and (hidden[1] == 0).all() and (added["text_embeds"][1] == 0).all()
    assert added["time_ids"].tolist() == [[512, 768, 0, 16, 512, 512], [1024, 1024, 8, 0, 1024, 1024]]


# ------------------------------------------------------------------------------------------- training
def test_the_second_text_encoder_has_its_own_rate_and_groups(sdxl_config, tiny_sdxl):
    cfg = sdxl_config(optim={"lr": 1e-3, "text_encoder_lr": 2e-4, "text_encoder_2_lr": 5e-5,
                             "lr_rules": [{"match": "unet.output", "lr_scale": 0.5}]})
    comps = load_components(str(tiny_sdxl))
    layers = inject_all(comps.adaptable(), cfg, comps.family)
    assert {n.split(".")[0] for n in layers} == {"unet", "text_encoder", "text_encoder_2"}
    assert all(n.startswith("text_encoder_2.encoder.") for n in layers if n.startswith("text_encoder_2."))
    groups = build_param_groups(layers, cfg, comps.family)
    rates = {n: a.lr for n, a in groups.assignment.items()}
    assert {r for n, r in rates.items() if n.startswith("text_encoder_2.")} == {5e-5}
    assert {r for n, r in rates.items() if n.startswith("text_encoder.")} == {2e-4}
    assert {r for n, r in rates.items() if n.startswith("unet.up_blocks.")} == {5e-4}
    assert {r for n, r in rates.items() if n.startswith("unet.down_blocks.")} == {1e-3}
    assert any(g["name"].startswith("text_encoder_2:") for g in groups.groups)


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("learnable", [False, True])
def test_export_reproduces_the_trained_model_in_the_sdxl_pipeline(sdxl_config, tiny_sdxl, init, learnable):
    cfg = sdxl_config(lora={"init": init, "learnable_alpha": learnable, "alpha": 3}, optim={"alpha_lr": 1e-2})
    result = train(cfg)
    c = result.components
    for m in (c.unet, c.text_encoder, c.text_encoder_2):
        m.eval()
    ours = sdxl_model_outputs(c.unet, c.text_encoder, c.text_encoder_2, c.tokenizer, c.tokenizer_2)
    pipe = load_sdxl_pipeline(tiny_sdxl)
    base = sdxl_pipeline_outputs(pipe)
    pipe.load_lora_weights(str(result.adapter_path))
    diff = max_abs_diff(ours, sdxl_pipeline_outputs(pipe))
    assert all(v <= TOL for v in diff.values()), diff
    moved = max_abs_diff(ours, base)  # the run changed every output the comparison checks, by far more than TOL
    assert all(v > 100 * TOL for v in moved.values()), moved


# ------------------------------------------------------------------------------------------- kohya layout
def test_kohya_sdxl_file_uses_the_original_block_names_and_loads_exactly_in_diffusers(sdxl_config, tiny_sdxl, tmp_path):
    from safetensors import safe_open

    from sdlora.adapter.io import load_adapter, save_adapter

    cfg = sdxl_config(lora={"init": "compensated", "learnable_alpha": True, "conv": True, "alpha": 3},
                      optim={"alpha_lr": 1e-2})
    result = train(cfg)
    c = result.components
    for m in (c.unet, c.text_encoder, c.text_encoder_2):
        m.eval()
    ours = sdxl_model_outputs(c.unet, c.text_encoder, c.text_encoder_2, c.tokenizer, c.tokenizer_2)
    native = load_adapter(result.adapter_path)
    path = tmp_path / "kohya.safetensors"
    save_adapter(native, path, "kohya")
    with safe_open(str(path), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    stems = {k.split(".")[0] for k in keys}
    assert {s.split("_")[1] for s in stems} == {"unet", "te1", "te2"}
    unet = [s for s in stems if s.startswith("lora_unet_")]
    # SDXL's original names: down_blocks.1.attentions.0 is input_blocks.4.1, up_blocks.0.attentions.2 output_blocks.2.1
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in unet
    assert "lora_unet_output_blocks_2_1_transformer_blocks_1_attn2_to_k" in unet
    assert "lora_unet_middle_block_1_proj_in" in unet
    assert not any("down_blocks" in s or "up_blocks" in s or "mid_block" in s for s in unet)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    # Read back by us: the same deltas, module by module
    back = load_adapter(path)
    assert set(back.modules) == set(native.modules)
    for n, m in native.modules.items():
        torch.testing.assert_close(back.modules[n].delta_weight(), m.delta_weight(), rtol=0, atol=1e-7)
    # Loaded by diffusers' kohya converter: the trained model's outputs
    pipe = load_sdxl_pipeline(tiny_sdxl)
    pipe.load_lora_weights(str(path))
    diff = max_abs_diff(ours, sdxl_pipeline_outputs(pipe))
    assert all(v <= TOL for v in diff.values()), diff
    # Per-module ranks (resize --sv-fro): diffusers keeps them but not per-module alphas (see adapter/kohya.py), so
    # the file has one alpha and each module's r / alpha in its factors; it loads as the resized adapter.
    from sdlora.adapter.algebra import merge_adapter
    from sdlora.commands.resize import resize_adapter

    resized, _ = resize_adapter(native, "sv_fro", 0.9, max_rank=3)
    assert len({m.rank for m in resized.modules.values()}) > 1
    save_adapter(resized, path, "kohya")
    pipe.unload_lora_weights()
    base = sdxl_pipeline_outputs(pipe)
    pipe.load_lora_weights(str(path))
    got = sdxl_pipeline_outputs(pipe)
    ref = load_components(str(tiny_sdxl))
    merge_adapter(resized, ref.adaptable())  # W + ΔW in float64: the adapter's own model
    for model in (ref.unet, ref.text_encoder, ref.text_encoder_2):
        model.eval()
    reference = sdxl_model_outputs(ref.unet, ref.text_encoder, ref.text_encoder_2, ref.tokenizer, ref.tokenizer_2)
    diff, effect = max_abs_diff(reference, got), max_abs_diff(reference, base)
    # Relative to the adapter's effect on each output (a module read at a wrong alpha / r is off by a share of it);
    # fp32 rounding of peft's B(A x) against the float64-merged reference stays ~1e-6 of it on any x86 CPU.
    assert all(diff[k] <= 1e-5 * effect[k] for k in diff), (diff, effect)


def test_a_part_rate_by_name_is_the_older_text_encoder_2_key_and_an_unknown_part_is_refused(sdxl_config, tiny_sdxl):
    """optim.part_lr.text_encoder_2 gives the same rates as optim.text_encoder_2_lr; giving both, or naming a part
    the model has no adapters in, is a one-line error."""
    comps = load_components(str(tiny_sdxl))
    layers = inject_all(comps.adaptable(), sdxl_config(), comps.family)
    old = sdxl_config(optim={"lr": 1e-3, "text_encoder_lr": 2e-4, "text_encoder_2_lr": 5e-5})
    new = sdxl_config(optim={"lr": 1e-3, "text_encoder_lr": 2e-4, "part_lr": {"text_encoder_2": 5e-5}})
    rates = [{n: a.lr for n, a in build_param_groups(layers, c, comps.family).assignment.items()} for c in (old, new)]
    assert rates[0] == rates[1] and {r for n, r in rates[1].items() if n.startswith("text_encoder_2.")} == {5e-5}
    with pytest.raises(UserError, match="optim.text_encoder_2_lr and optim.part_lr.text_encoder_2 are the same key"):
        sdxl_config(optim={"text_encoder_2_lr": 1e-4, "part_lr": {"text_encoder_2": 1e-4}})
    with pytest.raises(UserError, match=r"optim.part_lr.vae: SDXL has no part 'vae' that carries adapters"):
        build_param_groups(layers, sdxl_config(optim={"part_lr": {"vae": 1e-4}}), comps.family)
    with pytest.raises(UserError, match=r"optim.part_lr.text_encoder_2: got -1"):
        sdxl_config(optim={"part_lr": {"text_encoder_2": -1}})
