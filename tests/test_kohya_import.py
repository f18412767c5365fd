"""`sdlora import-kohya`: three kohya configs of different shapes each import, the table names every option of the
input, and the imported config trains on the tiny SD 1.x model. The fixtures are written here from kohya's documented
option names (sd-scripts library/train_util.py, docs/config_README-en.md; the kohya_ss GUI's saved JSON keys)."""

import json
import shutil
import tomllib
from pathlib import Path

import pytest
import yaml

from sdlora.cli import main
from sdlora.config import load_config
from sdlora.kohya_import.network import block_rules
from sdlora.training.loop import train


def _kohya_tree(root: Path, source: Path, folder: str, n: int, captions: bool = True) -> Path:
    (root / folder).mkdir(parents=True)
    for png in sorted(source.glob("*.png"))[:n]:
        shutil.copy(png, root / folder / png.name)
        if captions:
            shutil.copy(png.with_suffix(".txt"), root / folder / png.name.replace(".png", ".txt"))
    return root


def _import(args, capsys) -> tuple[int, str, str]:
    code = main(["import-kohya", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def _table_options(table: str) -> list[str]:
    """The first column of the printed table (rows between the ruler and the summary line)."""
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("----")) + 1
    return [line.split("  ")[0] for line in lines[start:] if line and not line.startswith(("wrote ", "note: "))]


def _train_two_steps(path: Path):
    cfg = load_config(path, ["train.max_steps=2", "optim.warmup_steps=0", "log.tracker=none"])
    return cfg, train(cfg, log=lambda *a: None)


def test_dreambooth_folder_tree_with_regularisation_images(tiny_model, shapes_data, tmp_path, capsys):
    img = _kohya_tree(tmp_path / "img", shapes_data, "3_sks shape", 4)
    reg = _kohya_tree(tmp_path / "reg", shapes_data, "1_shape", 2, captions=False)
    config = tmp_path / "kohya.toml"
    config.write_text(f"""
[model_arguments]
pretrained_model_name_or_path = "{tiny_model}"
v2 = false
[dataset_arguments]
train_data_dir = "{img}"
reg_data_dir = "{reg}"
resolution = "64,64"
caption_extension = ".txt"
shuffle_caption = true
keep_tokens = 1
caption_dropout_rate = 0.1
color_aug = true
[training_arguments]
output_dir = "{tmp_path / 'out'}"
output_name = "sks"
train_batch_size = 2
max_train_epochs = 2
prior_loss_weight = 0.5
noise_offset = 0.05
min_snr_gamma = 5
clip_skip = 2
xformers = true
save_every_n_epochs = 1
not_a_kohya_option = 1
[optimizer_arguments]
optimizer_type = "AdamW"
learning_rate = 1e-3
lr_scheduler = "cosine_with_restarts"
lr_warmup_steps = 0.25
[additional_network_arguments]
network_dim = 4
network_alpha = 2
""")
    out = tmp_path / "sdlora.yaml"
    code, table, err = _import([config, "--out", out], capsys)
    assert code == 0, err
    given = [k for section in tomllib.loads(config.read_text()).values() for k in section]
    shown = _table_options(table)
    assert all(any(s == k or s.endswith("." + k) for s in shown) for k in given), (given, shown)
    assert "not_a_kohya_option" in table and "unknown option" in table  # never silently dropped
    assert "color_aug" in [s.split(".")[-1] for s in shown] and "NOT SUPPORTED" in table
    data = yaml.safe_load(out.read_text())
    assert data["data"]["subsets"][0]["path"] == str(img) and data["data"]["subsets"][1] == {
        "path": str(reg), "is_regularization": True, "caption_extension": ".txt", "shuffle_tags": True,
        "keep_tokens": 1, "caption_dropout": 0.1}
    # 4 images x 3 repeats = 12, balanced by as many regularisation images: 24 per epoch / batch 2 = 12 steps
    assert data["train"]["max_steps"] == 24 and data["checkpoint"]["every_steps"] == 12
    assert data["checkpoint"]["keep_adapters"] is True  # kohya keeps every LoRA file it saves (no save_last_n_*)
    assert data["optim"] == {"optimizer": "adamw", "weight_decay": 0.01, "lr": 1e-3, "text_encoder_lr": 1e-3,
                             "scheduler": "cosine", "warmup_steps": 6}
    assert (data["lora"]["rank"], data["lora"]["alpha"], data["text_encoder"]["clip_skip"]) == (4, 2.0, 2)
    assert data["output"] == {"dir": str(tmp_path / "out" / "sks"), "name": "sks"}
    cfg, result = _train_two_steps(out)
    assert result.adapter_path.is_file() and cfg.data.prior_loss_weight == 0.5
    # kohya's module set: attention and feed-forward linears and proj_in/out, and the text encoder's MLP too
    assert any(n.endswith("ff.net.2") for n in result.layers) and any(n.endswith("proj_in") for n in result.layers)
    assert any(n.endswith("mlp.fc1") for n in result.layers)


def test_dataset_config_with_two_subsets(tiny_model, shapes_data, tmp_path, capsys):
    a = tmp_path / "a"
    b = tmp_path / "b"
    _kohya_tree(tmp_path, shapes_data, "a", 3)
    (tmp_path / "b").mkdir()
    for png in sorted(shapes_data.glob("*.png"))[3:6]:
        shutil.copy(png, b / png.name)
        (b / png.name.replace(".png", ".caption")).write_text("a shape, drawn, plain")
    dataset = tmp_path / "dataset.toml"
    dataset.write_text(f"""
[general]
shuffle_caption = true
caption_extension = ".txt"
keep_tokens = 1
enable_wildcard = true
[[datasets]]
resolution = 64
batch_size = 2
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 128
bucket_reso_steps = 64
  [[datasets.subsets]]
  image_dir = "{a}"
  num_repeats = 2
  [[datasets.subsets]]
  image_dir = "{b}"
  num_repeats = 1
  caption_extension = ".caption"
  class_tokens = "shape"
  keep_tokens_separator = "|||"
""")
    config = tmp_path / "kohya.toml"
    config.write_text(f"""
pretrained_model_name_or_path = "{tiny_model}"
dataset_config = "{dataset}"
output_dir = "{tmp_path / 'out'}"
network_dim = 4
network_alpha = 4
learning_rate = 1e-3
max_train_steps = 7
""")
    out = tmp_path / "sdlora.yaml"
    code, table, err = _import([config, "--out", out], capsys)
    assert code == 0, err
    shown = _table_options(table)
    for place in ("general.shuffle_caption", "datasets.0.resolution", "datasets.0.batch_size",
                  "datasets.0.subsets.0.num_repeats", "datasets.0.subsets.1.caption_extension",
                  "datasets.0.subsets.1.class_tokens", "datasets.0.subsets.1.keep_tokens_separator", "dataset_config",
                  "pretrained_model_name_or_path", "max_train_steps"):
        assert place in shown, (place, shown)
    assert "keep_tokens_separator" in table and "NOT SUPPORTED" in table
    data = yaml.safe_load(out.read_text())
    first, second = data["data"]["subsets"]
    assert (first["path"], first["repeats"], first["caption_extension"], first["keep_tokens"]) == (str(a), 2, ".txt", 1)
    assert (second["repeats"], second["caption_extension"], second["class_caption"]) == (1, ".caption", "shape")
    assert first["shuffle_tags"] and second["shuffle_tags"]  # [general] reaches every subset
    assert first["wildcards"] and second["multiline_captions"]  # kohya's enable_wildcard turns on both
    assert (data["train"]["batch_size"], data["train"]["max_steps"], data["data"]["max_side"]) == (2, 7, 128)
    assert data["data"]["bucketing"] is True
    _, result = _train_two_steps(out)
    assert result.adapter_path.is_file()


def test_datasets_at_different_resolutions_become_subset_resolutions(tiny_model, shapes_data, tmp_path, capsys):
    a, b, c = (_kohya_tree(tmp_path / name, shapes_data, "1_shape", 2) / "1_shape" for name in "abc")
    dataset = tmp_path / "dataset.toml"
    dataset.write_text(f"""
[general]
bucket_reso_steps = 32
caption_extension = ".txt"
[[datasets]]
resolution = 64
  [[datasets.subsets]]
  image_dir = "{a}"
[[datasets]]
resolution = "96,96"
  [[datasets.subsets]]
  image_dir = "{b}"
  [[datasets.subsets]]
  image_dir = "{c}"
""")
    config = tmp_path / "kohya.toml"
    config.write_text(f'pretrained_model_name_or_path = "{tiny_model}"\ndataset_config = "{dataset}"\n'
                      f'output_dir = "{tmp_path / "out"}"\nnetwork_dim = 4\nlearning_rate = 1e-3\nmax_train_steps = 2\n')
    out = tmp_path / "sdlora.yaml"
    code, table, err = _import([config, "--out", out], capsys)
    assert code == 0, err
    rows = {line.split("  ")[0]: line for line in table.splitlines()}
    assert "data.subsets.0.resolution" in rows["datasets.0.resolution"]
    assert "data.subsets.1.resolution, data.subsets.2.resolution" in rows["datasets.1.resolution"]
    assert not any("resolution" in line and "NOT SUPPORTED" in line for line in table.splitlines())
    data = yaml.safe_load(out.read_text())
    assert [s.get("resolution") for s in data["data"]["subsets"]] == [64, 96, 96]
    cfg, result = _train_two_steps(out)
    assert [s.resolution for s in cfg.data_subsets()] == [64, 96, 96] and result.step == 2


def test_gui_json_with_loraplus_and_block_weights(tiny_model, shapes_data, tmp_path, capsys):
    img = _kohya_tree(tmp_path / "img", shapes_data, "2_shape", 4)
    gui = {  # the GUI writes every field, numbers often as strings and "" for unset
        "LoRA_type": "Standard", "pretrained_model_name_or_path": str(tiny_model), "train_data_dir": str(img),
        "reg_data_dir": "", "output_dir": str(tmp_path / "out"), "output_name": "gui", "max_resolution": "64,64",
        "enable_bucket": True, "network_dim": "4", "network_alpha": "4", "conv_dim": 8, "conv_alpha": 1,
        "loraplus_lr_ratio": "16", "loraplus_unet_lr_ratio": "", "loraplus_text_encoder_lr_ratio": "",
        "down_lr_weight": "1,0.5,1,1,1,1,1,1,1,1,1,1", "mid_lr_weight": "0.25", "up_lr_weight": "1,1,1,0.5",
        "block_lr_zero_threshold": "", "block_dims": "", "optimizer": "AdamW", "optimizer_args": "", "unet_lr": "0.001",
        "text_encoder_lr": "0.0005", "learning_rate": "0.001", "lr_scheduler": "constant", "lr_warmup": "0",
        "train_batch_size": 2, "epoch": 1, "max_train_steps": "0", "max_train_epochs": "", "caption_extension": ".txt",
        "seed": "1234", "mixed_precision": "no", "save_precision": "fp16", "xformers": "xformers",
        "noise_offset_type": "Original", "noise_offset": 0, "multires_noise_iterations": 8, "sdxl": False,
        "flux1_checkbox": False, "num_cpu_threads_per_process": 2, "sample_every_n_steps": 0,
        "sample_prompts": "a red circle --n blurry --w 64 --h 64 --d 5 --s 2", "sample_sampler": "ddim",
        "factor": -1, "train_on_input": True}
    config = tmp_path / "gui.json"
    config.write_text(json.dumps(gui))
    out = tmp_path / "sdlora.yaml"
    code, table, err = _import([config, "--out", out], capsys)
    assert code == 0, err
    assert sorted(k for k in gui) == sorted(s for s in _table_options(table) if not s.startswith("("))
    data = yaml.safe_load(out.read_text())
    assert data["optim"]["b_lr_ratio"] == 16 and data["optim"]["lr"] == 0.001
    assert data["optim"]["text_encoder_lr"] == 0.0005
    assert data["lora"]["conv"] is True and data["lora"]["conv_targets"] == ["proj_in", "proj_out"]  # not LoCon
    assert data["sample"]["entries"] == [{"prompt": "a red circle", "negative_prompt": "blurry", "width": 64,
                                          "height": 64, "seed": 5, "num_inference_steps": 2}]
    assert data["train"]["max_steps"] == 4  # the GUI's epoch: 8 images with repeats / batch 2
    cfg, result = _train_two_steps(out)
    from sdlora.lora.groups import assign_rates

    rates = assign_rates(result.layers, cfg, result.components.family)
    lr = {name: a.lr for name, a in rates.items()}
    assert lr["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] == pytest.approx(0.0005)
    assert lr["unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"] == pytest.approx(0.00025)
    assert lr["unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"] == pytest.approx(0.0005)
    assert lr["unet.up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q"] == pytest.approx(0.001)
    assert lr["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"] == pytest.approx(0.001)
    assert lr["text_encoder.encoder.layers.0.self_attn.q_proj"] == pytest.approx(0.0005)


def test_block_weights_follow_kohyas_block_index():
    """SD 1.x: down weight k is down_blocks.(k-1)//3, its (k-1)%3-th attention (2: the downsampler); up weight k is
    up_blocks.k//3; a weight of 1 needs no rule; one rule per distinct weight."""
    rules = block_rules("0,0.5,0.5", None, "cosine", sdxl=False, conv=False)
    assert rules[0] == {"match": r"^unet\.(?:down_blocks\.0\.attentions\.0\.|down_blocks\.0\.attentions\.1\.)",
                        "lr_scale": 0.5}
    # kohya's cosine curve over 12 up blocks: sin(pi/2 * i/11) reversed; up_blocks.0 has no attention (no LoRA)
    assert len(rules) == 1 + 9 and rules[1]["match"] == r"^unet\.(?:up_blocks\.1\.attentions\.0\.)"
    assert block_rules(None, "2", None, sdxl=True, conv=True)[0]["match"] == r"^unet\.(?:mid_block\.resnets\.0\.)"


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    broken = tmp_path / "broken.toml"
    broken.write_text("network_dim = [\n")
    code, _, err = _import([broken, "--out", tmp_path / "x.yaml"], capsys)
    assert code == 2 and err.startswith("error: kohya config") and len(err.strip().splitlines()) == 1
    gui = tmp_path / "notgui.json"
    gui.write_text("[1, 2]")
    code, _, err = _import([gui, "--out", tmp_path / "x.yaml"], capsys)
    assert code == 2 and "top level" in err
    nodata = tmp_path / "nodata.toml"
    nodata.write_text('pretrained_model_name_or_path = "m"\noutput_dir = "o"\n')
    code, _, err = _import([nodata, "--out", tmp_path / "x.yaml"], capsys)
    assert code == 2 and "train_data_dir" in err and not (tmp_path / "x.yaml").exists()


def test_an_existing_out_is_kept_without_force(tiny_model, shapes_data, tmp_path, capsys):
    img = _kohya_tree(tmp_path / "img", shapes_data, "1_shape", 2)
    config = tmp_path / "k.toml"
    config.write_text(f'pretrained_model_name_or_path = "{tiny_model}"\ntrain_data_dir = "{img}"\n'
                      f'output_dir = "{tmp_path}"\nnetwork_dim = "four"\n')
    out = tmp_path / "new.yaml"
    out.write_text("mine")
    code, _, err = _import([config, "--out", out], capsys)
    assert code == 2 and "--force" in err and out.read_text() == "mine"
    code, table, err = _import([config, "--out", out, "--force"], capsys)
    assert code == 0, err
    assert "invalid value" in table and "'four'" in table  # an unreadable value is a row, not a traceback
    assert yaml.safe_load(out.read_text())["lora"]["rank"] == 4  # kohya's default rank stands


def test_docs_name_every_option_the_table_knows():
    from sdlora.kohya_import import dataset, network
    from sdlora.kohya_import.options import OPTIONS

    text = (Path(__file__).resolve().parents[1] / "docs" / "kohya.md").read_text(encoding="utf-8")
    names = [n for n in [*OPTIONS, *network.NETWORK_ARGS, *dataset.RULES] if not n.startswith("(")]
    missing = sorted({n for n in names if f"`{n}`" not in text and f"`{n} " not in text})
    assert not missing, f"docs/kohya.md does not name: {missing}"


@pytest.mark.parametrize("lines, optim, status", [
    ('optimizer_args = ["weight_decay=0.05"]\noptimizer_type = "AdamW8bit"', {"optimizer": "adamw8bit", "weight_decay": 0.05}, "mapped"),
    ('optimizer_type = "AdamW"', {"optimizer": "adamw", "weight_decay": 0.01}, "mapped"),
    ('optimizer_type = "Adafactor"\noptimizer_args = ["relative_step=False", "scale_parameter=False", "warmup_init=False"]',
     {"optimizer": "adafactor"}, "mapped"),
    ('optimizer_type = "Adafactor"', {}, "NOT SUPPORTED"),  # relative step: the rate would be ignored
    ('use_lion_optimizer = true', {"optimizer": "lion", "weight_decay": 0.0}, "mapped"),  # not kohya's AdamW default
    ('optimizer_type = "came_pytorch.CAME"', {"optimizer": "came"}, "mapped"),
    ('optimizer_type = "AdamWScheduleFree"', {"optimizer": "adamw_schedulefree"}, "mapped"),
    ('optimizer_type = "DAdaptAdam"', {}, "NOT SUPPORTED"),
])
def test_optimizer_types(tmp_path, lines, optim, status):
    from sdlora.kohya_import.convert import convert

    config = tmp_path / "k.toml"
    config.write_text(f'train_data_dir = "{tmp_path}"\n{lines}\n')
    data, rows, _ = convert(config)
    row = next(r for r in rows if r.option in ("optimizer_type", "use_lion_optimizer"))
    assert row.status == status, row
    got = data.get("optim", {})
    assert {k: got.get(k) for k in optim} == optim and (optim or "optimizer" not in got)


@pytest.mark.parametrize("lines, loss, statuses", [
    ('loss_type = "huber"\nhuber_c = 0.2', {"type": "pseudo_huber", "huber_schedule": "snr", "huber_delta": 0.2},
     {"loss_type": "mapped", "huber_c": "mapped"}),  # kohya's default schedule, snr, written out
    ('loss_type = "smooth_l1"\nhuber_schedule = "exponential"\nhuber_scale = 2.0',
     {"type": "smooth_l1", "huber_schedule": "exponential", "huber_scale": 2.0}, {"huber_schedule": "mapped"}),
    ('loss_type = "l1"', {"type": "l1"}, {"loss_type": "mapped"}),
    ('loss_type = "l2"\nhuber_c = 0.3\nhuber_schedule = "snr"', {}, {"loss_type": "off", "huber_c": "off"}),
    ('debiased_estimation_loss = true\nip_noise_gamma = 0.1\nip_noise_gamma_random_strength = true',
     {"debiased_estimation": True, "ip_noise_gamma": 0.1, "ip_noise_random_strength": True},
     {"debiased_estimation_loss": "mapped", "ip_noise_gamma_random_strength": "mapped"}),
    ('noise_offset = 0.05\nnoise_offset_random_strength = true\nadaptive_noise_scale = 0.01',
     {"noise_offset": 0.05, "noise_offset_random_strength": True, "adaptive_noise_scale": 0.01},
     {"noise_offset_random_strength": "mapped", "adaptive_noise_scale": "mapped"}),
    ('adaptive_noise_scale = 0.01\nnoise_offset = 0', {}, {"adaptive_noise_scale": "off"}),
    ('multires_noise_iterations = 6\nmultires_noise_discount = 0.4',
     {"multires_noise_iterations": 6, "multires_noise_discount": 0.4}, {"multires_noise_discount": "mapped"}),
    ('multires_noise_discount = 0.4\nip_noise_gamma_random_strength = true\nip_noise_gamma = 0', {},
     {"multires_noise_discount": "off", "ip_noise_gamma_random_strength": "off", "ip_noise_gamma": "off"}),
    ('loss_type = "huber"\nhuber_schedule = "cosine"', {"type": "pseudo_huber"}, {"huber_schedule": "invalid value"}),
])
def test_loss_and_noise_options(tmp_path, lines, loss, statuses):
    from sdlora.config import LossConfig
    from sdlora.kohya_import.convert import convert

    config = tmp_path / "k.toml"
    config.write_text(f'train_data_dir = "{tmp_path}"\n{lines}\n')
    data, rows, _ = convert(config)
    shown = {r.option: r.status for r in rows}
    assert {k: shown.get(k) for k in statuses} == statuses
    assert data.get("loss", {}) == loss
    LossConfig(**data.get("loss", {}))  # what the import writes validates


def test_gui_loss_and_noise_fields(tmp_path):
    """The GUI writes every field; with noise_offset_type Multires it passes multires_* and not noise_offset."""
    from sdlora.kohya_import.convert import convert

    gui = tmp_path / "g.json"
    gui.write_text(json.dumps({"LoRA_type": "Standard", "train_data_dir": str(tmp_path), "loss_type": "smooth_l1",
                               "huber_c": 0.2, "huber_schedule": "snr", "huber_scale": 1, "noise_offset_type": "Multires",
                               "noise_offset": 0.05, "adaptive_noise_scale": 0, "multires_noise_iterations": 8,
                               "multires_noise_discount": 0.3, "ip_noise_gamma": 0, "ip_noise_gamma_random_strength": False,
                               "debiased_estimation_loss": True}))
    data, rows, _ = convert(gui)
    assert data["loss"] == {"type": "smooth_l1", "huber_delta": 0.2, "huber_schedule": "snr", "huber_scale": 1.0,
                            "multires_noise_iterations": 8, "multires_noise_discount": 0.3, "debiased_estimation": True}


def test_a_command_line_in_a_script_imports(tmp_path, capsys):
    """The options after train_network.py, `--name value`, `--name=value`, switches, lists, continued lines."""
    from sdlora.kohya_import.convert import convert

    script = tmp_path / "train.sh"
    script.write_text(f"""#!/bin/sh
accelerate launch --num_cpu_threads_per_process 1 sdxl_train_network.py \\
  --pretrained_model_name_or_path="/m/sdxl" --train_data_dir "{tmp_path}" --output_dir out \\
  --network_module networks.lora --network_dim 8 --network_alpha=4 \\
  --network_args "conv_dim=4" "conv_alpha=2" "mid_lr_weight=0.5,1,1" \\
  --gradient_checkpointing --optimizer_type AdamW8bit --learning_rate 1e-4 --max_train_steps 300
""")
    data, rows, _ = convert(script)
    shown = {r.option: r for r in rows}
    assert {"--network_dim", "--network_args.conv_dim", "--gradient_checkpointing", "--pretrained_model_name_or_path",
            "(script) sdxl_train_network.py"} <= set(shown)
    assert "--num_cpu_threads_per_process" not in shown  # accelerate's own option, before the script
    assert data["model"]["path"] == "/m/sdxl" and data["lora"]["rank"] == 8 and data["lora"]["alpha"] == 4.0
    assert data["lora"]["conv_rank"] == 4 and data["train"]["gradient_checkpointing"] is True
    assert data["train"]["max_steps"] == 300 and data["optim"]["optimizer"] == "adamw8bit"
    assert data["optim"]["lr_rules"] == [{"match": r"^unet\.(?:mid_block\.resnets\.0\.)", "lr_scale": 0.5}]  # SDXL
    code = main(["import-kohya", str(tmp_path / "nothing.sh"), "--out", str(tmp_path / "x.yaml")])
    assert code == 2 and "not" in capsys.readouterr().err


def test_a_gui_prompt_sdlora_cannot_draw_is_a_row(tmp_path):
    from sdlora.kohya_import.convert import convert

    gui = tmp_path / "g.json"
    gui.write_text(json.dumps({"LoRA_type": "Standard", "train_data_dir": str(tmp_path),
                               "sample_prompts": "a cat --ss euler_a\na dog --d 3"}))
    data, rows, _ = convert(gui)
    row = next(r for r in rows if r.option == "sample_prompts")
    assert row.status == "NOT SUPPORTED" and "--ss euler_a" in row.detail and "sample" not in data


def test_no_output_dir_is_one_line_naming_it(tmp_path, capsys):
    """sd-scripts has no default output_dir (train_util.py: default None; saving fails): kohya's name, exit 2."""
    config = tmp_path / "k.toml"
    config.write_text(f'pretrained_model_name_or_path = "m"\ntrain_data_dir = "{tmp_path}"\n')
    code, _, err = _import([config, "--out", tmp_path / "x.yaml"], capsys)
    assert code == 2 and "output_dir" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.yaml").exists()


def test_an_invalid_value_writes_nothing(tmp_path):
    """A rule that rejects a value leaves the config as it was (the default stands), whatever it wrote first."""
    from sdlora.kohya_import.convert import convert

    config = tmp_path / "k.toml"
    config.write_text(f'train_data_dir = "{tmp_path}"\nnetwork_dim = -3\n')
    data, rows, _ = convert(config)
    assert next(r for r in rows if r.option == "network_dim").status == "invalid value"
    assert data["lora"]["rank"] == 4  # kohya's default network_dim


def test_a_path_that_is_not_text_is_an_invalid_row(tmp_path):
    """`conditioning_data_dir = 5` (a TOML number) is a mistake, not the folder "5": an invalid-value row, nothing
    written (an unusable image_dir: the next test)."""
    from sdlora.kohya_import.convert import convert

    dataset = tmp_path / "dataset.toml"
    dataset.write_text(f'[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "{tmp_path}"\n'
                       f'  conditioning_data_dir = 5\n')
    config = tmp_path / "k.toml"
    config.write_text(f'dataset_config = "{dataset}"\nvae = 7\n')
    data, rows, _ = convert(config)
    shown = {r.option: r.status for r in rows}
    assert shown["datasets.0.subsets.0.conditioning_data_dir"] == shown["vae"] == "invalid value", shown
    assert "mask_dir" not in data["data"] and "vae_path" not in data.get("model", {})


def test_min_bucket_reso_below_sdloras_minimum_is_clamped(tmp_path):
    """kohya allows min_bucket_reso 32; sdlora's data.min_side is at least 64: 64 is written, the row says so."""
    from sdlora.config import DataConfig
    from sdlora.kohya_import.convert import convert

    config = tmp_path / "k.toml"
    config.write_text(f'train_data_dir = "{tmp_path}"\nenable_bucket = true\nmin_bucket_reso = 32\n')
    data, rows, _ = convert(config)
    row = next(r for r in rows if r.option == "min_bucket_reso")
    assert row.status == "NOT SUPPORTED" and "64" in row.detail, row
    assert data["data"]["min_side"] == 64
    DataConfig(**data["data"])  # validates


def test_a_default_that_conflicts_names_its_dataset(tmp_path):
    """Two datasets, only the first sets enable_bucket: the second takes kohya's default, and its row says which."""
    from sdlora.kohya_import.convert import convert

    dataset = tmp_path / "dataset.toml"
    dataset.write_text(f'[[datasets]]\nenable_bucket = true\n  [[datasets.subsets]]\n  image_dir = "{tmp_path}"\n'
                       f'[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "{tmp_path}"\n')
    config = tmp_path / "k.toml"
    config.write_text(f'dataset_config = "{dataset}"\n')
    _, rows, _ = convert(config)
    row = next(r for r in rows if r.option == "(kohya default) enable_bucket")
    assert row.status == "NOT SUPPORTED" and "datasets.1" in row.detail, row


def test_a_subset_without_a_usable_image_dir_is_one_line(tmp_path, capsys):
    """kohya needs a folder for every subset: with its only image_dir unreadable, the error names it, in kohya's terms."""
    dataset = tmp_path / "dataset.toml"
    dataset.write_text('[[datasets]]\n  [[datasets.subsets]]\n  image_dir = 5\n')
    config = tmp_path / "k.toml"
    config.write_text(f'pretrained_model_name_or_path = "m"\ndataset_config = "{dataset}"\noutput_dir = "o"\n')
    code, _, err = _import([config, "--out", tmp_path / "x.yaml"], capsys)
    assert code == 2 and "datasets.0.subsets.0" in err and "image_dir" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x.yaml").exists()


@pytest.mark.parametrize("lines, checkpoint", [
    ("save_every_n_steps = 100", {"every_steps": 100, "keep_adapters": True}),  # kohya keeps every file it saves
    ("save_every_n_steps = 100\nsave_last_n_steps = 300", {"every_steps": 100, "keep_last": 3}),  # the last 300 only
    ("save_every_n_steps = 100\nsave_last_n_steps_state = 300", {"every_steps": 100, "keep_last": 3,
                                                                 "keep_adapters": True}),  # states limited, files not
    ("save_every_n_steps = 0", {}),
])
def test_saving_options_keep_what_kohya_keeps(tmp_path, lines, checkpoint):
    from sdlora.config import CheckpointConfig
    from sdlora.kohya_import.convert import convert

    config = tmp_path / "k.toml"
    config.write_text(f'train_data_dir = "{tmp_path}"\n{lines}\n')
    data, _, _ = convert(config)
    assert data.get("checkpoint", {}) == checkpoint
    CheckpointConfig(**data.get("checkpoint", {}))  # what the import writes validates
