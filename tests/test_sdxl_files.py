"""SDXL files: merged exports (diffusers folder and original-layout single file) that reproduce the trained model in
diffusers' own loaders, the single-file key layout on the real SDXL architecture against diffusers' converters,
single files read offline (prediction type and zero-SNR markers), and both tokenizers as SDXL's."""

import json
import shutil

import pytest
import torch
from accelerate import init_empty_weights
from safetensors import safe_open

from outputs import PROMPTS, max_abs_diff, sdxl_model_outputs
from sdlora.adapter.run_record import RunRecord
from sdlora.commands.export import run_export
from sdlora.config import validate
from sdlora.errors import UserError
from sdlora.lora import inject_all
from sdlora.model import ldm_keys as L
from sdlora.model.families import SDXL
from sdlora.model.loading import load_components
from sdlora.model.single_file import (BUNDLED_CONFIGS, CLIP_TOKENIZER, detect_family, detect_prediction_type,
                                      ldm_state_dict, load_tokenizer, read_checkpoint, save_single_file)
from sdlora.model.text import tokenize
from sdlora.model.tiny import make_tiny_sdxl
from sdlora.training.export import export_adapter
from sdxl_fixtures import tiny_sdxl  # noqa: F401 (fixture)

TOL = 1e-5  # fp32 on CPU: the same sums in the same order, up to the merge's rounding of W0 + ΔW
SDXL_CONFIGS = BUNDLED_CONFIGS / "sdxl_base_v1-0"
QUIET = lambda *_: None  # noqa: E731


def outputs_of(c):
    for m in (c.unet, c.text_encoder, c.text_encoder_2):
        m.eval()
    return sdxl_model_outputs(c.unet, c.text_encoder, c.text_encoder_2, c.tokenizer, c.tokenizer_2)


@pytest.fixture(scope="module")
def trained_sdxl(tiny_sdxl, tmp_path_factory):
    """Adapters on the UNet (linear and conv) and both text encoders, every factor and learnable alpha moved away
    from its initial value, with an offset init (the export is [s·B | -s0·B0]·[A; A0]); exported as a run."""
    run = tmp_path_factory.mktemp("sdxl-merged") / "run"
    cfg = validate({"model": {"path": str(tiny_sdxl)}, "data": {"path": str(run.parent)},
                    "output": {"dir": str(run)}, "log": {"tracker": "none"},
                    "lora": {"rank": 4, "alpha": 3, "init": "principal", "learnable_alpha": True, "conv": True}})
    comps = load_components(str(tiny_sdxl))
    layers = inject_all(comps.adaptable(), cfg, comps.family)
    assert {n.split(".")[0] for n in layers} == {"unet", "text_encoder", "text_encoder_2"}
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_A.add_(0.2 * torch.randn(layer.lora_A.shape, generator=g))
            layer.lora_B.add_(0.2 * torch.randn(layer.lora_B.shape, generator=g))
            layer.alpha.mul_(1.0 + 0.5 * float(torch.rand((), generator=g)))
    run.mkdir(parents=True)
    export_adapter(layers, run / "adapter.safetensors", cfg, RunRecord.from_training(cfg, comps), steps=10)
    return run, outputs_of(comps)


def assert_reproduces(ours, theirs, base=None):
    diff = max_abs_diff(ours, theirs)
    assert all(v <= TOL for v in diff.values()), diff
    if base is not None:  # the adapters changed every output compared, by far more than the tolerance
        moved = max_abs_diff(ours, base)
        assert all(v > 100 * TOL for v in moved.values()), moved


# --------------------------------------------------------------------------------------------- merged exports
def test_merged_sdxl_folder_loads_in_the_xl_pipeline_and_reproduces_the_trained_model(trained_sdxl, tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    run, ours = trained_sdxl
    out = run_export(run, "merged-diffusers", tmp_path / "merged", base=str(tiny_sdxl), report=QUIET)
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    base = outputs_of(load_components(str(tiny_sdxl)))
    assert_reproduces(ours, outputs_of(pipe), base)  # both text encoders merged, and the UNet
    assert RunRecord.from_folder(out).base_model_version == "sdxl_base_v1-0"


def test_merged_sdxl_single_file_has_the_original_layout_and_loads_in_from_single_file(trained_sdxl, tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    run, ours = trained_sdxl
    out = run_export(run, "merged-single-file", tmp_path / "merged.safetensors", base=str(tiny_sdxl),
                     report=QUIET)
    with safe_open(str(out), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert {L.SDXL_CLIP_L + "encoder.layers.0.self_attn.q_proj.weight", L.SDXL_OPEN_CLIP + "text_projection",
            L.SDXL_OPEN_CLIP + "transformer.resblocks.0.attn.in_proj_weight", L.UNET + "label_emb.0.0.weight",
            L.UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"} <= keys
    assert not any(k.startswith("cond_stage_model.") for k in keys) and L.V_PRED_KEY not in keys  # epsilon
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    # diffusers' own reader, offline with the model's configs: the merged model, both encoders included
    pipe = StableDiffusionXLPipeline.from_single_file(str(out), config=str(tiny_sdxl), local_files_only=True)
    assert_reproduces(ours, outputs_of(pipe), outputs_of(load_components(str(tiny_sdxl))))
    # with a config folder that holds the tokenizers' settings but not their vocabulary (as the bundled one), the
    # tokenizers are passed in
    configs = tmp_path / "configs"
    shutil.copytree(tiny_sdxl, configs, ignore=shutil.ignore_patterns("*.safetensors", "vocab.json", "merges.txt"))
    tokenizers = {name: load_tokenizer(tiny_sdxl, name) for name in SDXL.tokenizer_names}
    pipe = StableDiffusionXLPipeline.from_single_file(str(out), config=str(configs), local_files_only=True, **tokenizers)
    assert_reproduces(ours, outputs_of(pipe))
    # and sdlora's loader (diffusers' converters underneath)
    loaded = load_components(str(out), config_dir=str(tiny_sdxl))
    assert loaded.family is SDXL and loaded.prediction_type == "epsilon"
    assert_reproduces(ours, outputs_of(loaded))


# -------------------------------------------------------------------------------- the real SDXL architecture
def _real_sdxl():
    """SDXL base 1.0's four models on the meta device (no memory), from the bundled configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    read = lambda part: json.loads((SDXL_CONFIGS / part / "config.json").read_text())  # noqa: E731
    te = lambda part: CLIPTextConfig(**{k: v for k, v in read(part).items() if k not in ("architectures", "model_type")})  # noqa: E731
    with init_empty_weights():
        return (UNet2DConditionModel.from_config(read("unet")), AutoencoderKL.from_config(read("vae")),
                CLIPTextModel(te("text_encoder")), CLIPTextModelWithProjection(te("text_encoder_2")))


def test_sdxl_single_file_layout_covers_every_parameter_of_the_real_architecture_as_diffusers_reads_it():
    import diffusers.loaders.single_file_utils as oracle
    from types import SimpleNamespace

    unet, vae, te1, te2 = _real_sdxl()
    comps = SimpleNamespace(unet=unet, vae=vae, text_encoders={"text_encoder": te1, "text_encoder_2": te2},
                            family=SDXL, prediction_type="epsilon", zero_terminal_snr=False)
    ldm = ldm_state_dict(comps)
    # The released sd_xl_base_1.0.safetensors: 1680 UNet, 248 VAE, 197 CLIP-L (with position_ids) tensors, and 390
    # bigG tensors, of which logit_scale (unused by SDXL) is the one diffusers' model has no place for.
    count = lambda prefix: sum(k.startswith(prefix) for k in ldm)  # noqa: E731
    assert (count(L.UNET), count(L.VAE), count(L.SDXL_CLIP_L), count(L.SDXL_OPEN_CLIP)) == (1680, 248, 197, 389)
    assert detect_family(ldm) is SDXL
    # diffusers' own converters (what from_single_file runs) give back every parameter, with its shape
    shapes = lambda sd: {k.removeprefix("text_model."): tuple(v.shape) for k, v in sd.items()}  # noqa: E731
    assert shapes(oracle.convert_ldm_unet_checkpoint(dict(ldm), unet.config)) == shapes(unet.state_dict())
    assert shapes(oracle.convert_ldm_vae_checkpoint(dict(ldm), vae.config)) == shapes(vae.state_dict())
    assert shapes(oracle.convert_ldm_clip_checkpoint(dict(ldm))) == shapes(te1.state_dict()) | {"embeddings.position_ids": (1, 77)}
    got = oracle.convert_open_clip_checkpoint(te2, dict(ldm), prefix=L.SDXL_OPEN_CLIP)
    assert shapes(got) == shapes(te2.state_dict())


def test_the_fused_qkv_and_text_projection_round_trip_exactly():
    """Values, not shapes: OpenCLIP's fused in_proj and transposed projection read back by diffusers' converter."""
    import diffusers.loaders.single_file_utils as oracle
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    te = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=64, hidden_size=48, intermediate_size=96,
                                                    num_hidden_layers=2, num_attention_heads=4, projection_dim=40))
    ldm = L.open_clip_to_ldm(te.state_dict(), 2, L.SDXL_OPEN_CLIP)
    assert ldm[L.SDXL_OPEN_CLIP + "text_projection"].shape == (48, 40)  # x @ P in OpenCLIP
    back = oracle.convert_open_clip_checkpoint(te, ldm, prefix=L.SDXL_OPEN_CLIP)
    for k, v in te.state_dict().items():
        assert torch.equal(back[k], v), k
    ours = L.open_clip_from_ldm(ldm, te.state_dict().keys(), 2, L.SDXL_OPEN_CLIP)
    assert all(torch.equal(ours[k], v) for k, v in te.state_dict().items())


# ------------------------------------------------------------------------------------------- single files in
@pytest.fixture(scope="module")
def sdxl_v_file(tmp_path_factory):
    """A tiny v-prediction SDXL folder, its single file with the v_pred and ztsnr markers, and a config folder
    without a scheduler (so the file itself must say what it predicts)."""
    root = tmp_path_factory.mktemp("sdxl-v")
    folder = make_tiny_sdxl(root / "model", seed=1, v_prediction=True)
    comps = load_components(str(folder), zero_terminal_snr=True)
    path = root / "model.safetensors"
    save_single_file(path, comps)
    configs = root / "configs"
    shutil.copytree(folder, configs, ignore=shutil.ignore_patterns("*.safetensors", "scheduler"))
    return folder, path, configs, comps


def test_a_v_prediction_sdxl_file_carries_comfyuis_markers_and_loads_as_v_with_zero_snr(sdxl_v_file):
    folder, path, configs, comps = sdxl_v_file
    sd, meta = read_checkpoint(path, allow_pickle=False)
    assert sd[L.V_PRED_KEY].numel() == 0 and sd[L.ZTSNR_KEY].numel() == 0
    assert detect_prediction_type(sd, {}, "sdxl_base_v1-0") == "v_prediction"
    loaded = load_components(str(path), config_dir=str(configs))
    assert loaded.family is SDXL and loaded.prediction_type == "v_prediction" and loaded.zero_terminal_snr
    assert_reproduces(outputs_of(comps), outputs_of(loaded))
    # the file's markers win over a config folder's scheduler (here: v-prediction without zero SNR)
    configured = load_components(str(path), config_dir=str(folder))
    assert configured.prediction_type == "v_prediction" and configured.zero_terminal_snr


@pytest.mark.parametrize("markers", [(L.V_PRED_KEY,), (L.V_PRED_KEY, L.ZTSNR_KEY)], ids=["v_pred", "v_pred+ztsnr"])
def test_the_files_markers_win_over_an_epsilon_config_dir_and_model_settings_win_over_both(sdxl_v_file, tiny_sdxl,
                                                                                           tmp_path, markers):
    """config_dir gives the architecture; a file that says what it predicts (ComfyUI's marker keys) is trained so."""
    from sdlora.util.atomic import save_safetensors

    _, path, _, _ = sdxl_v_file
    sd, meta = read_checkpoint(path, allow_pickle=False)
    marked = tmp_path / "marked.safetensors"
    save_safetensors(marked, {k: v for k, v in sd.items() if k not in (L.V_PRED_KEY, L.ZTSNR_KEY) or k in markers},
                     metadata={k: v for k, v in meta.items() if not k.startswith(("modelspec.", "sdlora."))})
    assert json.load(open(tiny_sdxl / "scheduler" / "scheduler_config.json"))["prediction_type"] == "epsilon"
    loaded = load_components(str(marked), config_dir=str(tiny_sdxl))
    assert loaded.prediction_type == "v_prediction"
    assert loaded.zero_terminal_snr == (L.ZTSNR_KEY in markers)
    assert loaded.noise_scheduler.config.prediction_type == "v_prediction"
    # model.prediction_type / model.zero_terminal_snr are the user's explicit choice: they override the file
    explicit = load_components(str(marked), config_dir=str(tiny_sdxl), prediction_type="v_prediction",
                               zero_terminal_snr=False)
    assert explicit.prediction_type == "v_prediction" and not explicit.zero_terminal_snr


def test_sdxl_refiner_and_tiny_files_without_config_dir_are_one_line_errors(sdxl_v_file, tmp_path):
    from sdlora.util.atomic import save_safetensors

    _, path, _, _ = sdxl_v_file
    with pytest.raises(UserError, match="model.config_dir") as e:
        load_components(str(path))  # the bundled configs are the real SDXL's sizes
    assert "\n" not in str(e.value)
    refiner = tmp_path / "refiner.safetensors"
    save_safetensors(refiner, {L.UNET + "input_blocks.0.0.weight": torch.zeros(1),
                               "conditioner.embedders.0.model.text_projection": torch.zeros(1)})
    with pytest.raises(UserError, match="refiner"):
        load_components(str(refiner))


def test_a_single_file_vae_takes_the_sdxl_models_scaling_factor(tiny_sdxl, tmp_path):
    from sdlora.util.atomic import save_safetensors

    comps = load_components(str(tiny_sdxl))
    bare = {k.removeprefix(L.VAE): v for k, v in L.vae_to_ldm(comps.vae.state_dict(), dict(comps.vae.config)).items()}
    save_safetensors(tmp_path / "vae.safetensors", bare)
    swapped = load_components(str(tiny_sdxl), vae_path=str(tmp_path / "vae.safetensors"))
    assert swapped.vae.config.scaling_factor == 0.13025  # SDXL's latent scale, not SD 1.x's 0.18215


# ------------------------------------------------------------------------------------------------ tokenizers
CAPTIONS = ["a photo of a cat", "", "sks person, 1girl, solo, looking at viewer, red hair",
            " ".join(["a very long caption about a painting"] * 20)]  # truncated at 77


@pytest.fixture(scope="module")
def reference_tokenizers(tmp_path_factory):
    """SDXL's two tokenizers the way the Hugging Face folder ships them (vocab.json and merges.txt beside each
    tokenizer's config), read by transformers' from_pretrained: the reference for sdlora's bundled ones."""
    from transformers import CLIPTokenizer

    root = tmp_path_factory.mktemp("hf-tokenizers")
    toks = []
    for name in ("tokenizer", "tokenizer_2"):
        shutil.copytree(SDXL_CONFIGS / name, root / name)
        for f in ("vocab.json", "merges.txt"):
            shutil.copy(CLIP_TOKENIZER / f, root / name / f)
        toks.append(CLIPTokenizer.from_pretrained(root / name, local_files_only=True))
    return toks


def test_sdxls_second_tokenizer_pads_with_exclamation_mark_and_both_match_the_reference(reference_tokenizers):
    ours = [load_tokenizer(SDXL_CONFIGS, name) for name in SDXL.tokenizer_names]
    assert ours[0].pad_token_id == 49407 and ours[1].pad_token_id == 0 and ours[1].pad_token == "!"
    for mine, ref in zip(ours, reference_tokenizers):
        ids, expected = tokenize(mine, CAPTIONS), tokenize(ref, CAPTIONS)
        assert ids.shape == (len(CAPTIONS), 77) and torch.equal(ids, expected)
    first, second = (tokenize(t, CAPTIONS[:1])[0].tolist() for t in ours)
    assert first[:7] == second[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert set(first[7:]) == {49407} and set(second[7:]) == {0}
    assert tokenize(ours[1], CAPTIONS[3:])[0, -1] == 49407  # truncated: the window still ends with end-of-text


def test_the_conditioning_with_bundled_tokenizers_equals_encode_prompt_with_the_reference_ones(reference_tokenizers):
    """Text encoders of SDXL's kind with the real 49408-token vocabulary (small widths): sdlora's conditioning from
    its bundled tokenizers equals StableDiffusionXLPipeline.encode_prompt with the Hugging Face-layout tokenizers."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    config = lambda hidden, act: CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden,  # noqa: E731
                                                num_hidden_layers=3, num_attention_heads=4, hidden_act=act,
                                                projection_dim=40, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    te1, te2 = CLIPTextModel(config(32, "quick_gelu")).eval(), CLIPTextModelWithProjection(config(48, "gelu")).eval()
    pipe = StableDiffusionXLPipeline(vae=None, unet=None, scheduler=None, text_encoder=te1, text_encoder_2=te2,
                                     tokenizer=reference_tokenizers[0], tokenizer_2=reference_tokenizers[1],
                                     add_watermarker=False)
    ours = [load_tokenizer(SDXL_CONFIGS, name) for name in SDXL.tokenizer_names]
    prompts = PROMPTS + ["a cat"]
    with torch.no_grad():
        expected, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
        got = SDXL.encode([te1, te2], [tokenize(t, prompts) for t in ours])
        assert torch.equal(got.hidden, expected) and torch.equal(got.pooled, pooled)
        # the padding matters: padding the second encoder's input with end-of-text changes its tokens after the text
        eos_padded = tokenize(ours[0], prompts)
        assert not torch.allclose(SDXL.encode([te1, te2], [eos_padded, eos_padded]).hidden, expected)


def test_extract_from_an_sdxl_fine_tune_keeps_every_text_encoder(tiny_sdxl, tmp_path):
    """A fine-tune whose UNet and both text encoders moved: extract finds each component's change (it once looped
    over `unet` and `text_encoder` only and dropped `text_encoder_2` without a word)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from sdlora.adapter.io import load_adapter
    from sdlora.commands.extract import run_extract

    tuned = tmp_path / "tuned"
    shutil.copytree(tiny_sdxl, tuned)
    g = torch.Generator().manual_seed(5)
    for sub, cls, module in (("text_encoder", CLIPTextModel, "encoder.layers.1.self_attn.q_proj"),
                             ("text_encoder_2", CLIPTextModelWithProjection, "encoder.layers.2.mlp.fc1")):
        model = cls.from_pretrained(tuned / sub)
        weight = model.get_submodule(module if sub == "text_encoder" else "text_model." + module).weight
        with torch.no_grad():
            weight.add_(0.1 * torch.randn(weight.shape, generator=g))
        model.save_pretrained(tuned / sub)
    out = tmp_path / "extracted.safetensors"
    _, rows = run_extract(tiny_sdxl, tuned, out, 2, report=QUIET)
    assert {r["name"] for r in rows} == {"text_encoder.encoder.layers.1.self_attn.q_proj",
                                         "text_encoder_2.encoder.layers.2.mlp.fc1"}
    assert set(load_adapter(out).modules) == {r["name"] for r in rows}
