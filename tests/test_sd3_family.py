"""SD3 / SD3.5 as a model family (model/sd3.py, model/parts.SD3_PARTS): recognition from the transformer config,
conditioning equal to StableDiffusion3Pipeline.encode_prompt, DDPM-only options refused, LoRA targets and presets,
T5 frozen unless asked, block groups for optim.lr_rules. On the tiny SD3 models (conftest), seconds each."""

import re

import pytest
import torch

from conftest import deep_update
from sdlora.errors import UserError
from sdlora.model.loading import load_components
from sdlora.model.mmdit_keys import is_kohya_default_target, kohya_targets
from sdlora.model.text import tokenize
from sdlora.training.setup import build_model

T5_LEN = 8  # text_encoder.t5_max_length of these tests (the pipeline's default 256 would only be slower)
VARIANTS = [("tiny_sd3", "sd3", "medium"), ("tiny_sd3_no_t5", "sd3", "medium"), ("tiny_sd35m", "sd35m", "5-medium"),
            ("tiny_sd35l", "sd35l", "5-large")]


@pytest.fixture
def sd3_config(make_config):
    def build(model, extra=None):
        return make_config(deep_update({"model": {"path": str(model)}, "text_encoder": {"t5_max_length": T5_LEN}},
                                       extra or {}))
    return build


def quiet(*_a, **_k):
    pass


@pytest.mark.parametrize("fixture,name,version", VARIANTS)
def test_each_tiny_sd3_folder_is_recognised_from_its_transformer_config(request, fixture, name, version):
    comps = load_components(str(request.getfixturevalue(fixture)))
    assert comps.family.name == name and comps.base_model_version == version
    t5 = [] if "no_t5" in fixture else ["text_encoder_3"]
    assert list(comps.text_encoders) == ["text_encoder", "text_encoder_2"] + t5
    assert list(comps.adaptable()) == ["transformer", "text_encoder", "text_encoder_2"] + t5
    assert comps.family.kohya_base_fields("flow")["ss_base_model_version"] == version
    assert comps.family.modelspec("flow", title="t", lora=True)["modelspec.architecture"] == \
        f"stable-diffusion-3-{version}/lora"  # kohya's sai_model_spec: stable-diffusion-3-<model type>


@pytest.mark.parametrize("fixture", ["tiny_sd3", "tiny_sd3_no_t5"])
def test_the_family_conditioning_equals_the_pipelines_encode_prompt(request, sd3_config, fixture):
    """Bit-identical: the same encoders, the same ids, the same operations (T5's zeros without T5 included); the
    empty caption (a dropped caption) is the pipeline's unconditional input."""
    cfg = sd3_config(request.getfixturevalue(fixture))
    comps, _, _ = build_model(cfg, quiet)
    family = comps.family
    captions = ["a red circle on blue", ""]
    ids = [tokenize(t, captions, cfg.data.max_token_length) for t in comps.tokenizers]
    with torch.no_grad():
        cond = family.encode(list(comps.text_encoders.values()), ids, cfg.text_encoder.clip_skip)
        with torch.no_grad():
            from sdlora.lora import adapters_disabled

            with adapters_disabled(*comps.text_encoders.values()):
                base = family.encode(list(comps.text_encoders.values()), ids, cfg.text_encoder.clip_skip)
        pipe = family.pipeline(denoiser=comps.denoiser, vae=comps.vae, text_encoders=comps.text_encoders,
                               tokenizers=comps.tokenizers, scheduler=comps.noise_scheduler)
        hidden, _, pooled, _ = pipe.encode_prompt(captions, captions, captions, do_classifier_free_guidance=False,
                                                  max_sequence_length=T5_LEN)
    assert cond.hidden.shape == (2, 77 + T5_LEN, comps.denoiser.config.joint_attention_dim)
    assert torch.equal(cond.hidden, hidden) and torch.equal(cond.pooled, pooled)
    assert torch.equal(base.hidden, hidden)  # zero-init adapters: the base encoders' output


@pytest.mark.parametrize("extra,key", [
    ({"loss": {"min_snr_gamma": 5.0}}, "loss.min_snr_gamma"), ({"loss": {"noise_offset": 0.05}}, "loss.noise_offset"),
    ({"loss": {"min_timestep": 100}}, "loss.min_timestep"), ({"loss": {"max_timestep": 900}}, "loss.max_timestep"),
    ({"loss": {"debiased_estimation": True}}, "loss.debiased_estimation"),
    ({"loss": {"ip_noise_gamma": 0.1}}, "loss.ip_noise_gamma"),
    ({"loss": {"noise_offset_random_strength": True}}, "loss.noise_offset_random_strength"),
    ({"loss": {"adaptive_noise_scale": 0.01}}, "loss.adaptive_noise_scale"),
    ({"loss": {"multires_noise_iterations": 6}}, "loss.multires_noise_iterations"),
    ({"loss": {"timestep_sampling": "logit_normal"}}, "loss.timestep_sampling"),
    ({"loss": {"type": "pseudo_huber", "huber_schedule": "snr"}}, "loss.huber_schedule"),
    ({"model": {"prediction_type": "v_prediction"}}, "model.prediction_type"),
    ({"model": {"prediction_type": "v_prediction", "zero_terminal_snr": True}}, "model.prediction_type"),
    ({"data": {"max_token_length": 150}}, "data.max_token_length"),
    ({"text_encoder": {"train_parts": ["text_encoder_4"]}}, "text_encoder.train_parts"),
])
def test_ddpm_only_options_are_refused_in_one_line_on_sd3(tiny_sd3, sd3_config, extra, key):
    with pytest.raises(UserError, match=rf"^{key.replace('.', chr(92) + '.')}: ") as e:
        build_model(sd3_config(tiny_sd3, extra), quiet)
    assert "\n" not in str(e.value)


def test_rectified_flow_keys_are_refused_on_a_ddpm_model(make_config):
    with pytest.raises(UserError, match=r"^loss\.flow\.shift: rectified-flow keys apply to SD3"):
        build_model(make_config({"loss": {"flow": {"shift": 3.0}}}), quiet)


def test_the_objective_is_rectified_flow_from_loss_flow_with_the_schedulers_shift(tiny_sd3, sd3_config):
    from sdlora.model.flow_objective import FlowMatchingObjective

    comps, _, _ = build_model(sd3_config(tiny_sd3), quiet)
    objective = comps.family.objective(comps.noise_scheduler, comps.vae.config, sd3_config(tiny_sd3).loss)
    assert isinstance(objective, FlowMatchingObjective) and objective.draw_spec.shift == 3.0
    assert (objective.target, objective.weighting, objective.draw_spec.sampling) == ("velocity", "none", "logit_normal")
    cfg = sd3_config(tiny_sd3, {"loss": {"flow": {"shift": 1.5, "target": "x0", "weighting": "cosmap",
                                                  "timestep_sampling": "uniform", "min_sigma": 0.1}}})
    objective = comps.family.objective(comps.noise_scheduler, comps.vae.config, cfg.loss)
    assert (objective.draw_spec.shift, objective.target, objective.weighting) == (1.5, "x0", "cosmap")
    assert objective.draw_spec.sampling == "uniform" and objective.time_range == (0.1, 1.0)


def _adapted(layers, part):
    return {n.removeprefix(part + ".") for n in layers if n.startswith(part + ".")}


def test_default_targets_are_diffusers_both_streams_attention_and_t5_stays_frozen(tiny_sd35m, sd3_config):
    comps, layers, _ = build_model(sd3_config(tiny_sd35m), quiet)
    names = _adapted(layers, "transformer")
    attention = re.compile(r"\.attn2?\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$")
    expected = {p for p, m in load_components(str(tiny_sd35m)).denoiser.named_modules()
                if isinstance(m, torch.nn.Linear) and attention.search(p)}
    assert names == expected and any(".attn2." in n for n in names) and any("add_q_proj" in n for n in names)
    assert not _adapted(layers, "text_encoder_3") and _adapted(layers, "text_encoder") and _adapted(layers, "text_encoder_2")


def test_the_kohya_preset_is_every_linear_of_each_joint_block_as_kohya_names_them(tiny_sd35m, sd3_config):
    comps, layers, _ = build_model(sd3_config(tiny_sd35m, {"lora": {"unet_targets": ["preset:kohya"]}}), quiet)
    kohya = {p.diffusers for p in kohya_targets(dict(comps.denoiser.config)).values()
             if is_kohya_default_target(p.original)}
    assert _adapted(layers, "transformer") == kohya and any("norm1_context.linear" in n for n in kohya)
    with pytest.raises(UserError, match=r"^lora\.unet_targets: 'preset:peft' is no preset .*preset:attention, "
                                        r"preset:kohya"):
        build_model(sd3_config(tiny_sd35m, {"lora": {"unet_targets": ["preset:peft"]}}), quiet)


def test_t5_trains_on_request_with_its_q_k_v_o_and_its_own_rate(tiny_sd3, sd3_config):
    cfg = sd3_config(tiny_sd3, {"text_encoder": {"train_parts": ["text_encoder", "text_encoder_2", "text_encoder_3"]},
                                "optim": {"part_lr": {"text_encoder_3": 1e-5, "text_encoder_2": 2e-5},
                                          "text_encoder_lr": 3e-5}})
    _, layers, groups = build_model(cfg, quiet)
    t5 = _adapted(layers, "text_encoder_3")
    assert t5 and {n.rsplit(".", 1)[1] for n in t5} == {"q", "k", "v", "o"}
    rate = {part: a.lr for part in ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer")
            for n, a in groups.assignment.items() if n.startswith(part + ".")}
    assert rate == {"text_encoder": 3e-5, "text_encoder_2": 2e-5, "text_encoder_3": 1e-5, "transformer": 1e-3}


def test_joint_block_groups_for_lr_rules(tiny_sd3, sd3_config):
    cfg = sd3_config(tiny_sd3, {"optim": {"lr_rules": [{"match": "transformer.joint_blocks.1", "lr": 1e-5},
                                                       {"match": "text_encoder_2.layers.0", "lr_scale": 0.5}]}})
    _, layers, groups = build_model(cfg, quiet)
    a = groups.assignment
    assert {n for n in a if a[n].rule == 0} == {n for n in layers if n.startswith("transformer.transformer_blocks.1.")}
    assert {n for n in a if a[n].rule == 1} == {n for n in layers if n.startswith("text_encoder_2.encoder.layers.0.")}
    assert all(a[n].lr == 1e-3 for n in layers if n.startswith("transformer.transformer_blocks.0."))


def test_a_config_written_out_in_full_keeps_its_meaning(make_config, tiny_sd35m, sd3_config):
    """sdlora writes configs with every key (config.yaml of a run): the defaults read back as defaults on both
    families (no loss.flow refusal on SD 1.x, SD3's own default targets)."""
    from sdlora.config import validate

    build_model(validate(make_config().to_dict()), quiet)
    _, layers, _ = build_model(validate(sd3_config(tiny_sd35m).to_dict()), quiet)
    assert any(n.endswith(".add_q_proj") for n in layers)
