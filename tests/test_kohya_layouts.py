"""kohya's SDXL names number the UNet's original (LDM) blocks, and the numbering depends on the UNet's config
(`layers_per_block`, block types): a kohya file of an SDXL-family model whose UNet is not SDXL base's must be
numbered from that model's own config, as diffusers' and ComfyUI's converters number it on loading.
Tolerance: outputs through diffusers at 1e-5 absolute, as every export test of the project (outputs are O(1))."""

import shutil

import pytest
import torch

from outputs import load_sdxl_pipeline, max_abs_diff, sdxl_model_outputs, sdxl_pipeline_outputs
from sdlora.adapter.io import load_adapter, save_adapter
from sdlora.adapter.run_record import RunRecord
from sdlora.config import validate
from sdlora.errors import UserError
from sdlora.lora import inject_all
from sdlora.model.loading import load_components
from sdlora.training.export import export_adapter
from sdxl_fixtures import tiny_sdxl  # noqa: F401 (fixture)

TOL = 1e-5


@pytest.fixture(scope="module")
def one_layer_sdxl(tiny_sdxl, tmp_path_factory):
    """The tiny SDXL model with one resnet (and attention) per down level, two per up level, random weights."""
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("one_layer")
    model = root / "model"
    shutil.copytree(tiny_sdxl, model)
    config = dict(UNet2DConditionModel.load_config(tiny_sdxl / "unet"), layers_per_block=1)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.05)
    shutil.rmtree(model / "unet")
    unet.save_pretrained(model / "unet")
    return model


def _adapter(model, root, shapes_data=None):
    cfg = validate({"model": {"path": str(model)}, "data": {"path": str(root), "resolution": 64},
                    "output": {"dir": str(root / "run")}, "lora": {"rank": 4, "alpha": 4, "conv": True},
                    "log": {"tracker": "none"}})
    comps = load_components(cfg.model.path)
    layers = inject_all(comps.adaptable(), cfg, comps.family)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.add_(0.3 * torch.randn(layer.lora_B.shape, generator=g))
    path = root / "adapter.safetensors"
    export_adapter(layers, path, cfg, RunRecord.from_training(cfg, comps), steps=1)
    for m in comps.adaptable().values():
        m.eval()
    return path, sdxl_model_outputs(comps.unet, comps.text_encoder, comps.text_encoder_2, comps.tokenizer,
                                    comps.tokenizer_2)


def test_kohya_file_of_an_sdxl_model_with_one_layer_per_block_loads_exactly_in_diffusers(one_layer_sdxl, tmp_path):
    native, ours = _adapter(one_layer_sdxl, tmp_path)
    kohya = tmp_path / "kohya.safetensors"
    save_adapter(load_adapter(native), kohya, "kohya")
    back = load_adapter(kohya)
    assert set(back.modules) == set(load_adapter(native).modules)  # read back through the same numbering
    pipe = load_sdxl_pipeline(one_layer_sdxl)
    pipe.load_lora_weights(str(kohya))
    diff = max_abs_diff(ours, sdxl_pipeline_outputs(pipe))
    assert all(v <= TOL for v in diff.values()), diff


def test_a_module_outside_sdxl_bases_layout_without_a_record_is_a_one_line_error(one_layer_sdxl, tmp_path):
    from sdlora.adapter.weights import AdapterWeights, ModuleDelta

    # up_blocks.0 of SDXL base has three attentions (0-2): a fourth cannot be named without the model's config
    stray = AdapterWeights({"unet.up_blocks.0.attentions.3.proj_in": ModuleDelta(torch.ones(1, 8), torch.ones(8, 1)),
                            "text_encoder_2.encoder.layers.0.self_attn.q_proj": ModuleDelta(torch.ones(1, 8),
                                                                                            torch.ones(8, 1))})
    with pytest.raises(UserError, match="up_blocks.0.attentions.3.*layers_per_block"):
        save_adapter(stray, tmp_path / "x.safetensors", "kohya")
