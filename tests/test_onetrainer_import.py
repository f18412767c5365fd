"""`sdlora import-onetrainer`: OneTrainer configs of different shapes each import, the table names every option of
the input, and the imported config trains on the tiny SD 1.x model; refusals are one line and exit 2. The fixtures
are written here from OneTrainer's documented config fields (modules/util/config/TrainConfig.py, ConceptConfig.py,
SampleConfig.py, modules/util/enum/*; config version 11)."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from sdlora.cli import main
from sdlora.config import load_config
from sdlora.onetrainer_import.read import flatten
from sdlora.training.loop import train


def _concept_folder(folder: Path, source: Path, pngs: slice) -> Path:
    folder.mkdir(parents=True)
    for png in sorted(source.glob("*.png"))[pngs]:
        shutil.copy(png, folder / png.name)
        shutil.copy(png.with_suffix(".txt"), folder / png.with_suffix(".txt").name)
    return folder


def _import(args, capsys) -> tuple[int, str, str]:
    code = main(["import-onetrainer", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def _table_options(table: str) -> list[str]:
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("----")) + 1
    return [line.split("  ")[0] for line in lines[start:] if line and not line.startswith(("wrote ", "note: "))]


def _row(table: str, option: str) -> str:
    return next(line for line in table.splitlines() if line.split("  ")[0] == option)


def _every_option(config: dict, *lists: tuple[str, list]) -> set[str]:
    """The dotted names the table must show: the config's options and each concept's / sample's fields."""
    names = {k for k, _ in flatten({k: v for k, v in config.items() if k not in ("concepts", "samples")})}
    for where, items in lists:
        names |= {f"{where}.{i}.{k}" for i, item in enumerate(items) for k, _ in flatten(item)}
    return names


def _train_two_steps(path: Path, *overrides: str):
    cfg = load_config(path, ["train.max_steps=2", "optim.warmup_steps=0", "log.tracker=none", *overrides])
    return cfg, train(cfg, log=lambda *a: None)


def _ui_config(model, run: Path, concepts: list | None, samples: list | None, **extra) -> dict:
    """What OneTrainer's UI saves for an SD 1.5 LoRA (a selection of its ~200 keys, its own spellings)."""
    config = {
        "__version": 11, "training_method": "LORA", "model_type": "STABLE_DIFFUSION_15", "debug_mode": False,
        "workspace_dir": str(run), "cache_dir": "workspace-cache/run", "tensorboard": False, "validation": False,
        "validate_after": 1, "validate_after_unit": "EPOCH", "continue_last_backup": False,
        "base_model_name": str(model), "output_dtype": "BFLOAT_16", "output_model_format": "SAFETENSORS",
        "output_model_destination": "models/shapes.safetensors", "concept_file_name": "training_concepts/concepts.json",
        "concepts": concepts, "aspect_ratio_bucketing": True, "latent_caching": True,
        "learning_rate_scheduler": "COSINE", "learning_rate": 3e-4, "learning_rate_warmup_steps": 0.1,
        "learning_rate_cycles": 1.0, "learning_rate_min_factor": 0.0, "epochs": 2, "batch_size": 2,
        "gradient_accumulation_steps": 1, "ema": "OFF", "ema_decay": 0.999, "ema_update_step_interval": 5,
        "dataloader_threads": 2, "train_device": "cuda", "train_dtype": "FLOAT_32", "resolution": "64",
        "attention_mechanism": "SDP", "mse_strength": 1.0, "mae_strength": 0.0, "log_cosh_strength": 0.0,
        "huber_strength": 0.0, "huber_delta": 1.0, "vb_loss_strength": 1.0, "loss_weight_fn": "MIN_SNR_GAMMA",
        "loss_weight_strength": 5.0, "dropout_probability": 0.0, "loss_scaler": "NONE", "learning_rate_scaler": "NONE",
        "clip_grad_norm": 1.0, "offset_noise_weight": 0.05, "generalized_offset_noise": False,
        "perturbation_noise_weight": 0.0, "rescale_noise_scheduler_to_zero_terminal_snr": False,
        "force_v_prediction": False, "force_epsilon_prediction": False, "min_noising_strength": 0.0,
        "max_noising_strength": 1.0, "timestep_distribution": "UNIFORM", "noising_weight": 0.0, "noising_bias": 0.0,
        "timestep_shift": 1.0, "dynamic_timestep_shifting": False,
        "unet": {"model_name": "", "include": True, "train": True, "stop_training_after": 0,
                 "stop_training_after_unit": "NEVER", "learning_rate": None, "weight_dtype": "FLOAT_32",
                 "dropout_probability": 0.0, "train_embedding": True, "attention_mask": False, "guidance_scale": 1.0,
                 "gradient_checkpointing": "ON", "offload_fraction": 0.0, "activation_offloading": False},
        "prior": {"train": True, "weight_dtype": "FLOAT_32"},
        "text_encoder": {"include": True, "train": True, "learning_rate": 1e-4, "weight_dtype": "FLOAT_32",
                         "dropout_probability": 0.05, "stop_training_after": 30, "stop_training_after_unit": "NEVER"},
        "text_encoder_layer_skip": 1, "text_encoder_2_layer_skip": 0,
        "vae": {"model_name": "", "weight_dtype": "FLOAT_32"},
        "masked_training": False, "unmasked_probability": 0.1, "unmasked_weight": 0.1,
        "normalize_masked_area_loss": False, "layer_filter": "", "layer_filter_preset": "attn-only",
        "embedding_learning_rate": None, "additional_embeddings": [],
        "cloud": {"enabled": False, "type": "RUNPOD", "gpu_type": ""},
        "peft_type": "LORA", "lora_model_name": "", "lora_rank": 4, "lora_alpha": 2.0, "lora_decompose": False,
        "lora_weight_dtype": "FLOAT_32", "oft_block_size": 32, "lokr_dim": 16, "lokr_use_tucker": False,
        "optimizer": {"optimizer": "ADAMW", "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01,
                      "amsgrad": False, "foreach": False, "maximize": False, "capturable": False,
                      "differentiable": False, "fused": True, "stochastic_rounding": False, "fused_back_pass": False},
        "optimizer_defaults": {"ADAMW": {"beta1": 0.9}},
        "sample_definition_file_name": "training_samples/samples.json", "samples": samples,
        "sample_after": 1, "sample_after_unit": "EPOCH", "sample_skip_first": 0, "sample_image_format": "JPG",
        "non_ema_sampling": True, "backup_after": 30, "backup_after_unit": "MINUTE", "rolling_backup": False,
        "rolling_backup_count": 3, "backup_before_save": True, "save_every": 0, "save_every_unit": "NEVER",
        "save_skip_first": 0, "save_filename_prefix": "",
    }
    config.update(extra)
    return config


def _concept(path: Path, balancing=1.0, **fields) -> dict:
    concept = {"name": path.name, "path": str(path), "seed": 12, "enabled": True, "type": "STANDARD",
               "include_subdirectories": False, "image_variations": 1, "text_variations": 1, "balancing": balancing,
               "balancing_strategy": "REPEATS", "loss_weight": 1.0,
               "image": {"enable_crop_jitter": False, "enable_random_flip": True, "enable_random_rotate": False,
                         "random_rotate_max_angle": 0.0, "enable_resolution_override": False,
                         "resolution_override": "512"},
               "text": {"prompt_source": "sample", "prompt_path": "", "enable_tag_shuffling": True,
                        "tag_delimiter": ",", "keep_tags_count": 1, "tag_dropout_enable": False,
                        "tag_dropout_mode": "FULL", "tag_dropout_probability": 0.0, "caps_randomize_enable": False}}
    for key, value in fields.items():
        part, _, name = key.partition("__")
        (concept[part] if name else concept)[name or part] = value
    return concept


SAMPLE = {"enabled": True, "prompt": "a red circle", "negative_prompt": "blurry", "height": 64, "width": 64,
          "seed": 7, "random_seed": False, "diffusion_steps": 2, "cfg_scale": 5.0, "noise_scheduler": "DDIM",
          "text_encoder_1_layer_skip": 0, "sample_inpainting": False}


def test_ui_config_with_inline_concepts_and_samples(tiny_model, shapes_data, tmp_path, capsys):
    a = _concept_folder(tmp_path / "a", shapes_data, slice(0, 4))
    b = _concept_folder(tmp_path / "b", shapes_data, slice(4, 7))
    concepts = [_concept(a, 2.0), _concept(b, 1.0, text__enable_tag_shuffling=False),
                _concept(tmp_path / "off", enabled=False)]
    disabled = dict(SAMPLE, enabled=False, prompt="never drawn")
    config = _ui_config(tiny_model, tmp_path / "run", concepts, [SAMPLE, disabled], not_a_onetrainer_option=1,
                        ema="GPU")
    path = tmp_path / "onetrainer.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "sdlora.yaml"
    code, table, err = _import([path, "--out", out], capsys)
    assert code == 0, err
    shown = _table_options(table)
    assert _every_option(config, ("concepts", concepts), ("samples", [SAMPLE, disabled])) <= set(shown)
    assert len(shown) == len(set(shown))  # one row each
    assert "unknown option" in _row(table, "not_a_onetrainer_option")  # never silently dropped
    assert "NOT SUPPORTED" in _row(table, "backup_after")  # every 30 minutes: sdlora counts in steps
    assert "off" in _row(table, "concepts.2.path") and "disabled" in _row(table, "samples.1.prompt")
    data = yaml.safe_load(out.read_text())
    assert data["data"]["subsets"] == [
        {"path": str(a), "repeats": 2, "caption_extension": ".txt", "multiline_captions": True, "shuffle_tags": True,
         "keep_tokens": 1},
        {"path": str(b), "repeats": 1, "caption_extension": ".txt", "multiline_captions": True}]
    # 4 images x 2 + 3 images x 1 = 11 per epoch / batch 2 = 6 steps; 2 epochs = 12; warm-up 0.1 of 12 = 1
    assert data["train"]["max_steps"] == 12 and data["sample"]["every_steps"] == 6
    assert data["optim"] == {"lr": 3e-4, "text_encoder_lr": 1e-4, "scheduler": "cosine", "warmup_steps": 1,
                             "max_grad_norm": 1.0, "optimizer": "adamw", "betas": [0.9, 0.999], "eps": 1e-8,
                             "weight_decay": 0.01}
    assert (data["lora"], data["text_encoder"]) == ({"type": "lora", "rank": 4, "alpha": 2.0},
                                                    {"clip_skip": 2, "train": True})
    assert data["loss"] == {"min_snr_gamma": 5.0, "noise_offset": 0.05}
    # OneTrainer averages every 5 steps at 0.999, sdlora every step: 0.999 ** (1/5) spans as many steps
    # (a float computed the same way both sides: 1e-12 only absorbs the YAML round trip's last digit)
    assert data["train"]["ema"] == {"enabled": True, "device": "same", "decay": pytest.approx(0.999 ** 0.2, rel=1e-12)}
    assert data["data"]["flip"] is True and data["data"]["caption_dropout"] == 0.05
    assert data["sample"]["entries"] == [{"prompt": "a red circle", "negative_prompt": "blurry", "height": 64,
                                          "width": 64, "seed": 7, "num_inference_steps": 2, "guidance_scale": 5.0}]
    assert data["output"] == {"dir": str(tmp_path / "run"), "name": "shapes"} and data["export"]["dtype"] == "bf16"
    cfg, result = _train_two_steps(out, "sample.every_steps=0")
    assert result.adapter_path.is_file() and cfg.data_subsets()[0].multiline_captions


def test_concept_and_sample_files_are_read_only_when_named(tiny_model, shapes_data, tmp_path, capsys):
    a = _concept_folder(tmp_path / "a", shapes_data, slice(0, 4))
    held_out = _concept_folder(tmp_path / "held_out", shapes_data, slice(6, 8))
    concepts = [_concept(a, 1.5, image__enable_crop_jitter=True, image__enable_resolution_override=True,
                         image__resolution_override="64"),
                _concept(held_out, type="VALIDATION")]
    (tmp_path / "concepts.json").write_text(json.dumps(concepts))
    (tmp_path / "samples.json").write_text(json.dumps([dict(SAMPLE, noise_scheduler="EULER_A")]))
    optimizer = {"optimizer": "PRODIGY", "beta1": 0.9, "beta2": 0.999, "beta3": None, "eps": 1e-8, "weight_decay": 0,
                 "decouple": True, "use_bias_correction": False, "safeguard_warmup": False, "d0": 1e-6, "d_coef": 1.0,
                 "growth_rate": float("inf"), "fsdp_in_use": False, "slice_p": 11}
    config = _ui_config(tiny_model, tmp_path / "run", None, None, concept_file_name="concepts.json",
                        sample_definition_file_name="samples.json", optimizer=optimizer, learning_rate=1.0,
                        peft_type="LOHA", lora_rank=2, lora_alpha=1.0, validation=True, validate_after=2,
                        validate_after_unit="STEP", backup_after=4, backup_after_unit="STEP", rolling_backup=True,
                        rolling_backup_count=2, learning_rate_scheduler="CONSTANT", learning_rate_warmup_steps=0,
                        layer_filter_preset="attn-mlp")
    config["text_encoder"]["learning_rate"] = None
    path = tmp_path / "onetrainer.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "sdlora.yaml"
    code, table, err = _import([path, "--out", out], capsys)  # the file names them; the command line does not
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--concepts concepts.json" in err, err
    assert "not read: a path chosen by the file" in _row(table, "concept_file_name") and not out.exists()
    code, table, err = _import([path, "--concepts", tmp_path / "concepts.json", "--samples", tmp_path / "samples.json",
                                "--out", out], capsys)
    assert code == 0, err
    shown = set(_table_options(table))
    assert _every_option(config, ("concepts", concepts), ("samples", [SAMPLE])) <= shown
    assert "NOT SUPPORTED" in _row(table, "concepts.0.balancing")  # 1.5: sdlora's repeats are whole numbers
    assert "NOT SUPPORTED" in _row(table, "optimizer.slice_p") and "NOT SUPPORTED" in _row(table, "samples.0.noise_scheduler")
    assert "off" in _row(table, "optimizer.d0")  # Prodigy's own default
    data = yaml.safe_load(out.read_text())
    assert data["data"]["subsets"] == [{"path": str(a), "repeats": 2, "resolution": 64, "caption_extension": ".txt",
                                        "multiline_captions": True, "shuffle_tags": True, "keep_tokens": 1}]
    assert data["validation"] == {"path": str(held_out), "every_steps": 2}
    assert data["checkpoint"] == {"every_steps": 4, "keep_last": 2}
    assert data["lora"] == {"type": "loha", "rank": 2, "alpha": 1.0,
                            "unet_targets": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]}
    assert data["optim"]["optimizer"] == "prodigy" and data["optim"]["lr"] == data["optim"]["text_encoder_lr"] == 1.0
    # OneTrainer's epoch: 4 images x 1.5 = 6 samples / batch 2 = 3 steps; 2 epochs = 6 (the same number of steps)
    assert data["data"]["crop"] == "random" and data["train"]["max_steps"] == 6
    cfg, result = _train_two_steps(out, "validation.every_steps=0")
    assert result.adapter_path.is_file() and cfg.lora.type == "loha"


def test_hand_written_config_takes_onetrainer_defaults(tiny_model, shapes_data, tmp_path, capsys):
    """A short file: what it leaves out means OneTrainer's default (rank 16, alpha 1, lr 3e-6, 100 epochs, fp16),
    written explicitly; DoRA, an fp8 base, Adafactor and a CPU EMA carry over."""
    a = _concept_folder(tmp_path / "a", shapes_data, slice(0, 2))
    config = {"training_method": "LORA", "base_model_name": str(tiny_model), "workspace_dir": str(tmp_path / "run"),
              "resolution": "64, 96", "lora_decompose": True, "mse_strength": 0.0, "mae_strength": 1.0,
              "loss_weight_fn": "DEBIASED_ESTIMATION", "perturbation_noise_weight": 0.1,
              "timestep_distribution": "HEAVY_TAIL", "noising_weight": 0.5, "noising_bias": 0.3, "ema": "CPU", "ema_update_step_interval": 1,
              "unet": {"weight_dtype": "FLOAT_8"}, "text_encoder": {"weight_dtype": "FLOAT_8", "train": False},
              "optimizer": {"optimizer": "ADAFACTOR", "eps": 1e-30, "eps2": 1e-3, "clip_threshold": 1.0,
                            "decay_rate": -0.8, "relative_step": False, "scale_parameter": False},
              "concepts": [{"path": str(a)}]}
    path = tmp_path / "onetrainer.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "sdlora.yaml"
    code, table, err = _import([path, "--out", out], capsys)
    assert code == 0, err
    assert "OneTrainer default" in _row(table, "(OneTrainer default) lora_rank")
    data = yaml.safe_load(out.read_text())
    assert (data["lora"], data["model"]["base_precision"]) == ({"type": "dora", "rank": 16, "alpha": 1.0}, "fp8")
    assert data["optim"] == {"optimizer": "adafactor", "weight_decay": 0.0, "lr": 3e-6, "text_encoder_lr": 3e-6,
                             "warmup_steps": 200}
    assert data["train"] == {"ema": {"enabled": True, "device": "cpu", "decay": 0.999}, "max_steps": 200,
                             "mixed_precision": "fp16"}  # 2 images / batch 1 = 2 steps a epoch, 100 epochs
    assert data["text_encoder"] == {"train": False} and data["data"]["resolution"] == [64, 96]
    assert data["loss"] == {"type": "l1", "debiased_estimation": True, "ip_noise_gamma": 0.1,
                            "timestep_sampling": "mode", "mode_scale": 0.5}  # HEAVY_TAIL reads noising_weight only
    assert "not read by timestep_distribution HEAVY_TAIL" in _row(table, "noising_bias")
    cfg, result = _train_two_steps(out, "train.mixed_precision='no'")  # CPU: no fp16 autocast
    assert result.adapter_path.is_file() and cfg.model.base_precision == "fp8"


def test_sd3_flow_options_map_to_loss_flow(tmp_path, capsys):
    config = {"__version": 9, "training_method": "LORA", "model_type": "STABLE_DIFFUSION_35",
              "base_model_name": str(tmp_path / "sd35"), "workspace_dir": str(tmp_path / "run"), "epochs": 1,
              "timestep_distribution": "LOGIT_NORMAL", "noising_bias": 0.5, "noising_weight": 0.2,
              "timestep_shift": 3.0, "min_noising_strength": 0.1, "learning_rate_warmup_steps": 0,
              "transformer": {"train": True, "learning_rate": 2e-4}, "unet": {"train": True},
              "text_encoder": {"train": True}, "text_encoder_2": {"train": True}, "text_encoder_3": {"train": True},
              "concepts": []}
    path = tmp_path / "onetrainer.json"
    path.write_text(json.dumps(config))
    code, table, err = _import([path, "--out", tmp_path / "x.yaml"], capsys)
    assert code == 2 and "no enabled STANDARD concept" in err and len(err.strip().splitlines()) == 1
    assert "no effect" in _row(table, "unet.train")  # SD3 has no UNet
    (tmp_path / "img").mkdir()
    config["concepts"] = [{"path": str(tmp_path / "img")}]
    path.write_text(json.dumps(config))
    code, table, err = _import([path, "--out", tmp_path / "x.yaml", "--force"], capsys)
    assert code == 0, err
    assert "note: config version 9, the table follows version 11" in table  # an older file: its renamed keys
    data = yaml.safe_load((tmp_path / "x.yaml").read_text())
    assert data["loss"] == {"flow": {"timestep_sampling": "logit_normal", "logit_mean": 0.5, "logit_std": 1.2,
                                     "shift": 3.0, "min_sigma": 0.1}}
    assert data["text_encoder"]["train_parts"] == ["text_encoder", "text_encoder_2", "text_encoder_3"]
    assert data["optim"]["lr"] == 2e-4


@pytest.mark.parametrize("content, says", [
    ('{"__version": 11, "model_type": "FLUX_DEV_1", "training_method": "LORA", "concepts": []}',
     "model_type FLUX_DEV_1: sdlora does not train this model type"),
    ('{"__version": 11, "model_type": "STABLE_DIFFUSION_15_INPAINTING", "training_method": "LORA", "concepts": []}',
     "not inpainting"),
    ('{"__version": 11, "model_type": "STABLE_DIFFUSION_15", "training_method": "EMBEDDING", "concepts": []}',
     "not a textual-inversion embedding"),
    ('{"__version": 11, "model_type": ', "does not parse as JSON"),
    ('[{"__version": 11}]', "expected an object"),
    ('{"name": "not a OneTrainer config"}', "not a config saved by OneTrainer"),
])
def test_refused_input_is_one_line_and_exit_2(tmp_path, capsys, content, says):
    path = tmp_path / "onetrainer.json"
    path.write_text(content)
    code, table, err = _import([path, "--out", tmp_path / "x.yaml"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and says in err, err
    assert not (tmp_path / "x.yaml").exists()
    if "model_type" in says or "training_method" in says or "embedding" in says or "inpainting" in says:
        assert "NOT SUPPORTED" in table  # the table still shows every row, the refusal among them


def test_warm_up_longer_than_the_run_is_cut_to_the_run(shapes_data, tmp_path, capsys):
    """OneTrainer runs a 200-step warm-up (its default) in a 2-step run; sdlora refuses warm-up past the end, so the
    import writes the run's length and says so in the row."""
    config = {"__version": 11, "training_method": "LORA", "base_model_name": str(tmp_path / "m"),
              "workspace_dir": str(tmp_path / "run"), "epochs": 1, "batch_size": 4,
              "concepts": [{"path": str(shapes_data)}]}  # 8 images / batch 4 = 2 steps
    path = tmp_path / "onetrainer.json"
    path.write_text(json.dumps(config))
    code, table, err = _import([path, "--out", tmp_path / "x.yaml"], capsys)
    assert code == 0, err
    data = yaml.safe_load((tmp_path / "x.yaml").read_text())
    assert (data["train"]["max_steps"], data["optim"]["warmup_steps"]) == (2, 2)
    assert "NOT SUPPORTED" in _row(table, "(OneTrainer default) learning_rate_warmup_steps")
