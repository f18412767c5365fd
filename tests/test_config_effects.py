"""Keys with no effect in this configuration (issue 25, item 4): a warning at start, listed by --dry-run, or an
error where the setting is surely a mistake; one table (sdlora/config_effects.py) evaluated in one place."""

import copy
import subprocess
import sys

import pytest

from conftest import deep_update
from sdlora.config import Config, dump_yaml, validate
from sdlora.config_effects import RULES, ModelFacts, check, given
from sdlora.errors import UserError

BASE = {"model": {"path": "m"}, "data": {"path": "d"}, "output": {"dir": "o"}}
SD1 = ModelFacts(("text_encoder",), single_file=False, pickle=False)
SDXL_FILE = ModelFacts(("text_encoder", "text_encoder_2"), single_file=True, pickle=False)


def cfg_of(extra: dict):
    return validate(deep_update(copy.deepcopy(BASE), extra))


# (the config, the key warned about, the same config with the condition met: no warning)
IDLE = [
    ({"lora": {"conv_rank": 8}}, "lora.conv_rank", {"lora": {"conv_rank": 8, "conv": True}}),
    ({"lora": {"conv_alpha": 2.0, "conv_targets": ["conv1"]}}, "lora.conv_alpha and lora.conv_targets",
     {"lora": {"conv": True, "conv_alpha": 2.0, "conv_targets": ["conv1"]}}),
    ({"optim": {"text_encoder_lr": 1e-5}, "text_encoder": {"train": False}}, "optim.text_encoder_lr",
     {"optim": {"text_encoder_lr": 1e-5}}),
    ({"data": {"cache_dir": "c"}}, "data.cache_dir", {"data": {"cache_dir": "c", "cache_latents": "disk"}}),
    ({"data": {"keep_tokens": 2}}, "data.keep_tokens", {"data": {"keep_tokens": 2, "shuffle_tags": True}}),
    ({"optim": {"alpha_lr": 1e-3}}, "optim.alpha_lr", {"optim": {"alpha_lr": 1e-3}, "lora": {"learnable_alpha": True}}),
    ({"loss": {"huber_delta": 0.3}}, "loss.huber_delta", {"loss": {"huber_delta": 0.3, "type": "huber"}}),
    ({"loss": {"huber_schedule": "snr"}}, "loss.huber_schedule", {"loss": {"huber_schedule": "snr", "type": "smooth_l1"}}),
    ({"loss": {"huber_scale": 2.0, "type": "pseudo_huber", "huber_schedule": "snr"}}, "loss.huber_scale",
     {"loss": {"huber_scale": 2.0, "type": "pseudo_huber", "huber_schedule": "exponential"}}),
    ({"loss": {"noise_offset_random_strength": True}}, "loss.noise_offset_random_strength",
     {"loss": {"noise_offset_random_strength": True, "noise_offset": 0.05}}),
    ({"loss": {"adaptive_noise_scale": 0.01}}, "loss.adaptive_noise_scale",
     {"loss": {"adaptive_noise_scale": 0.01, "noise_offset": 0.05}}),
    ({"loss": {"multires_noise_discount": 0.5}}, "loss.multires_noise_discount",
     {"loss": {"multires_noise_discount": 0.5, "multires_noise_iterations": 6}}),
    ({"loss": {"ip_noise_random_strength": True}}, "loss.ip_noise_random_strength",
     {"loss": {"ip_noise_random_strength": True, "ip_noise_gamma": 0.1}}),
    ({"loss": {"logit_std": 2.0}}, "loss.logit_std", {"loss": {"logit_std": 2.0, "timestep_sampling": "logit_normal"}}),
    ({"loss": {"mode_scale": 0.5}}, "loss.mode_scale", {"loss": {"mode_scale": 0.5, "timestep_sampling": "mode"}}),
    ({"train": {"ema": {"decay": 0.99}}}, "train.ema.decay", {"train": {"ema": {"decay": 0.99, "enabled": True}}}),
    ({"sample": {"prompts": ["a cat"]}}, "sample.prompts", {"sample": {"prompts": ["a cat"], "every_steps": 5}}),
    ({"reg": {"embedding_norm": {"weight": 0.1}}, "text_encoder": {"train": False}}, "reg.embedding_norm.weight",
     {"reg": {"embedding_norm": {"weight": 0.1}}}),
    ({"reg": {"preservation": {"every_steps": 4}}}, "reg.preservation.every_steps",
     {"reg": {"preservation": {"every_steps": 4, "weight": 0.5}}}),
    ({"checkpoint": {"keep_last": 5}}, "checkpoint.keep_last", {"checkpoint": {"keep_last": 5, "every_steps": 10}}),
    ({"checkpoint": {"keep_adapters": True}}, "checkpoint.keep_adapters",
     {"checkpoint": {"keep_adapters": True, "every_steps": 10}}),
    ({"export": {"reduce_rank": True}}, "export.reduce_rank", {"export": {"reduce_rank": True},
                                                               "lora": {"init": "compensated"}}),
    ({"data": {"num_workers": 2, "cache_latents": "memory"}}, "data.num_workers", {"data": {"num_workers": 2}}),
    ({"sample": {"prompts": ["a"], "every_steps": 5, "guidance_scale": 1.0, "negative_prompt": "blur"}},
     "sample.negative_prompt", {"sample": {"prompts": ["a"], "every_steps": 5, "negative_prompt": "blur"}}),
]


@pytest.mark.parametrize("idle, key, effective", IDLE, ids=[k for _, k, _ in IDLE])
def test_a_key_without_effect_is_a_warning_naming_it_and_silent_when_it_applies(idle, key, effective):
    warnings = check(cfg_of(idle), SD1)
    assert len(warnings) == 1 and warnings[0].startswith(f"sdlora: warning: {key} ") and "effect only with" in \
        warnings[0], warnings
    assert check(cfg_of(effective), SD1) == []


def test_keys_that_need_the_model_are_judged_with_it():
    cfg = cfg_of({"model": {"config_dir": "configs"}, "optim": {"text_encoder_2_lr": 1e-5},
                  "reg": {"embedding_norm": {"pooled_weight": 0.1}}})
    warned = " ".join(check(cfg, SD1))  # a diffusers folder, one text encoder
    for key in ("model.config_dir", "optim.text_encoder_2_lr", "reg.embedding_norm.pooled_weight"):
        assert key in warned, (key, warned)
    assert check(cfg, SDXL_FILE) == []
    assert check(cfg) == []  # at validation nothing is judged without the model (and these are warnings)
    pickle = cfg_of({"model": {"allow_pickle": True}})
    assert "model.allow_pickle" in " ".join(check(pickle, SD1))
    assert check(pickle, ModelFacts(("text_encoder",), single_file=True, pickle=True)) == []


@pytest.mark.parametrize("extra, message", [
    ({"validation": {"num_images": 2}}, r"validation.num_images is set but has effect only with validation.every_steps"),
    ({"data": {"mask_dir": "masks"}}, r"data.mask_dir is set but has effect only with data.masked_loss: true"),
    ({"lora": {"lokr_factor": 4}}, r"lora.lokr_factor is set but has effect only with lora.type: lokr"),
])
def test_a_key_that_is_surely_a_mistake_fails_validation(extra, message):
    with pytest.raises(UserError, match=rf"^config error: {message}"):
        cfg_of(extra)


def test_a_runs_own_config_file_warns_of_nothing(tmp_path):
    """A saved config.yaml lists every key at its value: keys at their defaults are not "set"."""
    from sdlora.config import load_config

    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(cfg_of({"lora": {"rank": 8}})))
    cfg = load_config(path)
    assert given(cfg, "lora.rank") and not given(cfg, "lora.conv_rank")
    assert check(cfg, SD1) == []


def test_every_key_in_the_table_is_in_the_schema():
    for rule in RULES:
        for key in rule.keys:
            *path, name = key.split(".")
            section = Config
            for part in path:
                section = section.model_fields[part].annotation
            assert name in section.model_fields, key


def test_dry_run_lists_the_warnings_and_a_run_prints_them_at_start(tiny_model, shapes_data, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{path: {tiny_model}}}\ndata: {{path: {shapes_data}, resolution: 64, cache_dir: "
                   f"{tmp_path / 'cache'}}}\noutput: {{dir: {tmp_path / 'run'}}}\nlog: {{tracker: none}}\n"
                   "lora: {rank: 4, alpha: 4, conv_rank: 8}\noptim: {text_encoder_lr: 1.0e-5}\n"
                   "text_encoder: {train: false}\n")
    proc = subprocess.run([sys.executable, "-m", "sdlora.cli", "train", "--config", str(cfg), "--dry-run"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    warned = [line for line in proc.stdout.splitlines() if line.startswith("sdlora: warning:")]
    assert [w.split()[2] for w in warned] == ["data.cache_dir", "lora.conv_rank", "optim.text_encoder_lr"], proc.stdout
