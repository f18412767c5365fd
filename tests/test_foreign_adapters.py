"""Adapters that sdlora did not train (kohya sd-scripts' and LyCORIS' files, with their `ss_*` metadata or none, and
`sdlora extract`'s): every command that rewrites one keeps its model family's names and labels, which come from the
file's modules (names and shapes) when no sdlora run record says it (sdlora/adapter/family.py)."""

import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdlora.adapter.io import load_adapter
from sdlora.adapter.kohya import kohya_name
from sdlora.adapter.weights import ModuleDelta
from sdlora.commands.export import run_export
from sdlora.commands.merge import run_merge
from sdlora.commands.resize import run_resize
from sdlora.model.families import SD1, SD2, SDXL
from sdxl_fixtures import tiny_sdxl  # noqa: F401 (fixture)

KOHYA_SDXL_META = {"ss_base_model_version": "sdxl_base_v1-0", "ss_network_module": "networks.lora",
                   "ss_network_dim": "4", "ss_network_alpha": "2.0", "ss_v2": "False",
                   "ss_sd_model_name": "sd_xl_base_1.0.safetensors", "ss_output_name": "theirs"}


def quiet(*_a, **_k):
    pass


def _unet_linears(model_dir):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    return {f"unet.{n}": m.weight.shape for n, m in unet.named_modules()
            if isinstance(m, torch.nn.Linear) and ".attentions." in n}


def _kohya_file(path, shapes, family, meta, *, seed=0):
    """A kohya LoRA of rank 4, alpha 2, over `shapes` (canonical name -> weight shape), named as kohya names them."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (out, inp) in shapes.items():
        stem = kohya_name(name, family)
        sd[f"{stem}.lora_down.weight"] = torch.randn(4, inp, generator=g)
        sd[f"{stem}.lora_up.weight"] = torch.randn(out, 4, generator=g)
        sd[f"{stem}.alpha"] = torch.tensor(2.0)
    save_file(sd, str(path), metadata=meta)
    return {k.split(".")[0] for k in sd}


def _stems_and_meta(path):
    with safe_open(str(path), framework="pt") as f:
        return {k.split(".")[0] for k in f.keys()}, dict(f.metadata())


@pytest.mark.parametrize("meta", [KOHYA_SDXL_META, None], ids=["kohya-metadata", "no-metadata"])
def test_another_trainers_sdxl_unet_file_keeps_sdxl_names_and_labels_through_export_merge_and_resize(
        tiny_sdxl, tmp_path, meta):
    shapes = _unet_linears(tiny_sdxl)
    theirs = tmp_path / "theirs.safetensors"
    stems = _kohya_file(theirs, shapes, SDXL, meta)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in stems
    outs = {"export": run_export(theirs, "kohya", tmp_path / "export.safetensors", report=quiet)}
    run_merge([theirs, theirs], tmp_path / "merge.safetensors", layout="kohya", report=quiet)
    run_resize(theirs, tmp_path / "resize.safetensors", "rank", 2, layout="kohya", report=quiet)
    outs.update(merge=tmp_path / "merge.safetensors", resize=tmp_path / "resize.safetensors")
    for command, out in outs.items():
        written, m = _stems_and_meta(out)
        assert written == stems, (command, sorted(written - stems)[:3])  # SDXL's original block names
        assert m["ss_base_model_version"] == "sdxl_base_v1-0", command
        assert m["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora", command
    # the rewritten file still holds the same update, read back through the same names
    a, b = load_adapter(theirs), load_adapter(outs["export"])
    for n, mod in a.modules.items():
        torch.testing.assert_close(b.modules[n].delta_weight(), mod.delta_weight(), rtol=1e-6, atol=0)


def test_an_extracted_sdxl_adapter_exports_as_sdxl_with_both_text_encoders(tiny_sdxl, tmp_path):
    from sdlora.commands.extract import run_extract

    tuned = tmp_path / "tuned"
    shutil.copytree(tiny_sdxl, tuned)
    g = torch.Generator().manual_seed(3)
    for part, end in (("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"),
                      ("text_encoder", "encoder.layers.0.self_attn.q_proj.weight"),
                      ("text_encoder_2", "encoder.layers.0.self_attn.q_proj.weight")):
        f = next((tuned / part).glob("*.safetensors"))
        sd = load_file(str(f))
        key = next(k for k in sd if k.endswith(end))  # with or without transformers 4's `text_model.`
        sd[key] = sd[key] + 0.1 * torch.randn(sd[key].shape, generator=g)
        save_file(sd, str(f), metadata={"format": "pt"})
    extracted = tmp_path / "extracted.safetensors"
    run_extract(tiny_sdxl, tuned, extracted, 2, report=quiet)
    assert set(load_adapter(extracted).modules) == {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "text_encoder.encoder.layers.0.self_attn.q_proj", "text_encoder_2.encoder.layers.0.self_attn.q_proj"}
    out = run_export(extracted, "kohya", tmp_path / "kohya.safetensors", report=quiet)
    stems, meta = _stems_and_meta(out)
    assert stems == {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                     "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                     "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"}
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"


def test_a_file_without_metadata_takes_sd2_labels_from_its_shapes(tmp_path):
    """SD 2.x's proj_in is Linear and its cross-attention reads 1024 features (SD 1.x: 1x1 conv, 768)."""
    shapes = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (320, 1024),
              "unet.down_blocks.0.attentions.0.proj_in": (320, 320)}
    theirs = tmp_path / "sd2.safetensors"
    stems = _kohya_file(theirs, shapes, SD2, None)
    out = run_export(theirs, "kohya", tmp_path / "out.safetensors", report=quiet)
    written, meta = _stems_and_meta(out)
    assert written == stems and meta["ss_v2"] == "True" and meta["ss_base_model_version"] == "sd_v2"


def test_the_modules_win_over_a_contradicting_label_and_sd1_stays_the_default():
    from sdlora.adapter.family import adapter_family
    from sdlora.adapter.weights import AdapterWeights

    def adapter(names, meta=None, width=768):
        return AdapterWeights({n: ModuleDelta(torch.zeros(1, width), torch.zeros(8, 1)) for n in names}, meta or {})

    sdxl = ["unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert adapter_family(adapter(sdxl, {"ss_base_model_version": "sd_v1"}))[0] is SDXL
    sd1 = ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert adapter_family(adapter(sd1, {"ss_base_model_version": "sdxl_base_v1-0"}))[0] is SD1
    assert adapter_family(adapter(sd1, {"ss_base_model_version": "sd_v2_v"})) == (SD2, "v_prediction")
    undecided = ["text_encoder.encoder.layers.0.self_attn.q_proj"]
    assert adapter_family(adapter(undecided))[0] is SD1
    assert adapter_family(adapter(undecided, {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}))[0] is SDXL
