"""The family owns its parts (model/parts.py): loading, canonical names and kohya names follow the parts table.

The design target is a family whose denoiser is not a UNet: an SD3-shaped table (transformer, three text encoders
with T5, FlowMatchEulerDiscreteScheduler), written here and nowhere else, loads the tiny SD3 folder with the
loader every family uses."""

import pytest

from sdlora.adapter.names import canonical_name, split_name
from sdlora.errors import UserError
from sdlora.model import parts as P
from sdlora.model.families import FAMILIES, SD1, SDXL, ModelFamily
from sdlora.model.loading import load_components, load_parts

SD3_PARTS = (
    P.Part("transformer", P.DENOISER, "diffusers.SD3Transformer2DModel", kohya_prefix="lora_unet_"),
    P.Part("text_encoder", P.TEXT_ENCODER, "transformers.CLIPTextModelWithProjection", tokenizer="tokenizer",
           model_level="text_model.", kohya_prefix="lora_te1_"),
    P.Part("text_encoder_2", P.TEXT_ENCODER, "transformers.CLIPTextModelWithProjection", tokenizer="tokenizer_2",
           model_level="text_model.", kohya_prefix="lora_te2_"),
    P.Part("text_encoder_3", P.TEXT_ENCODER, "transformers.T5EncoderModel", tokenizer="tokenizer_3",
           tokenizer_class="transformers.T5TokenizerFast", kohya_prefix="lora_te3_", lora=False),
    P.Part("vae", P.VAE, "diffusers.AutoencoderKL"),
)


def _sd3_family():
    return ModelFamily(name="sd3-sketch", title="SD3 (sketch)", kohya_version="sd3", modelspec_architecture="sd3",
                       modelspec_architecture_v="sd3", resolution=1024, resolution_v=1024, parts=SD3_PARTS,
                       scheduler_class="FlowMatchEulerDiscreteScheduler", pipeline_class="StableDiffusion3Pipeline",
                       pipeline_options={})


def test_an_sd3_parts_table_loads_the_tiny_sd3_folder_with_the_common_loader(tiny_sd3):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import T5EncoderModel

    family = _sd3_family()
    comps = load_parts(tiny_sd3, family)
    assert isinstance(comps.denoiser, SD3Transformer2DModel) and comps.unet is comps.denoiser
    assert list(comps.text_encoders) == ["text_encoder", "text_encoder_2", "text_encoder_3"]
    assert isinstance(comps.text_encoders["text_encoder_3"], T5EncoderModel) and len(comps.tokenizers) == 3
    assert isinstance(comps.noise_scheduler, FlowMatchEulerDiscreteScheduler)
    assert list(comps.adaptable()) == ["transformer", "text_encoder", "text_encoder_2", "text_encoder_3"]
    assert family.kohya_prefixes == {"transformer": "lora_unet_", "text_encoder": "lora_te1_",
                                     "text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_"}
    # the pipeline's keyword arguments come from the table too: the family rebuilds diffusers' own pipeline
    pipe = family.pipeline(denoiser=comps.denoiser, vae=comps.vae, text_encoders=comps.text_encoders,
                           tokenizers=comps.tokenizers, scheduler=comps.noise_scheduler)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and pipe.transformer is comps.denoiser


def test_a_family_without_one_denoiser_and_one_vae_is_refused():
    with pytest.raises(ValueError, match="needs one denoiser, one VAE"):
        ModelFamily(name="x", title="x", kohya_version="x", modelspec_architecture="x", modelspec_architecture_v="x",
                    resolution=8, resolution_v=8, parts=SD3_PARTS[1:])


def test_a_folder_with_no_known_denoiser_is_refused_by_name(tiny_sd3, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_sd3, folder)
    shutil.move(folder / "transformer", folder / "mmdit")
    with pytest.raises(UserError, match=r"has no denoiser subfolder sdlora knows \(transformer, unet\)"):
        load_components(str(folder))


def test_names_and_kohya_prefixes_come_from_the_registered_families_parts():
    assert {p for f in FAMILIES.values() for p in f.adaptable_parts} == {"unet", "transformer", "text_encoder",
                                                                         "text_encoder_2", "text_encoder_3"}
    assert canonical_name("text_encoder_2", "text_model.encoder.layers.0.mlp.fc1") == "text_encoder_2.encoder.layers.0.mlp.fc1"
    assert canonical_name("unet", "down_blocks.0.attentions.0.proj_in") == "unet.down_blocks.0.attentions.0.proj_in"
    with pytest.raises(ValueError, match="not a canonical module name: vae.encoder"):
        split_name("vae.encoder.conv_in")
    assert SD1.kohya_prefixes == {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    assert SDXL.tokenizer_names == ("tokenizer", "tokenizer_2") and SDXL.denoiser.name == "unet"


def test_a_kohya_prefix_two_families_share_is_read_by_the_files_family(monkeypatch):
    """`lora_unet_` is SD's UNet and SD3's transformer: with both registered, the file's family picks the part, and a
    key no family is given for is a one-line error instead of a guess."""
    from sdlora.adapter import kohya

    sketch = _sd3_family()
    monkeypatch.setattr(kohya, "PREFIXES", kohya._prefix_table([*FAMILIES.values(), sketch]))
    monkeypatch.setattr(kohya, "PARTS", {**kohya.PARTS, "transformer": sketch.denoiser})
    assert kohya.PREFIXES["lora_unet_"] == ("unet", "transformer")
    name = "transformer.transformer_blocks.0.attn.to_q"
    stem = "lora_unet_transformer_blocks_0_attn_to_q"
    assert kohya.canonical_from_kohya(stem, frozenset({name}), family=sketch) == name
    assert kohya.canonical_from_kohya("lora_unet_down_blocks_0_attentions_0_proj_in", family=SD1) == \
        "unet.down_blocks.0.attentions.0.proj_in"
    # No family said, and neither part's module words spell the key: one line, never a guess (a key exactly one
    # part spells is read as that part's: adapter/kohya.canonical_from_kohya).
    with pytest.raises(UserError, match="is not a module path of a unet or transformer|does not say its family"):
        kohya.canonical_from_kohya(stem, frozenset({name}))
    assert kohya.canonical_from_kohya("lora_te2_text_model_encoder_layers_0_mlp_fc1") == \
        "text_encoder_2.encoder.layers.0.mlp.fc1"  # a prefix one part stands for needs no family
