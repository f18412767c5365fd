"""OneTrainer's concepts -> `data.subsets` (and `validation.path`), its samples -> `sample.entries`, one row per field.

A concept (modules/util/config/ConceptConfig.py) is a folder with its own repeats (`balancing`, strategy REPEATS:
each image `balancing` times per epoch, sdlora's `repeats`, no "subtract one"), caption source, tag shuffling and
dropout, and image augmentations. OneTrainer's `sample` caption source reads the .txt beside each image and draws
one of its lines each time the image is used (mgds SelectRandomText): sdlora's `multiline_captions`. Augmentations
sdlora has (random flip, crop jitter = random crops) are one setting for the whole run in sdlora; concepts that
disagree get a note.

The concept folders are listed (not opened) to count their images, as `import-kohya` does, for the epoch length.
"""

from __future__ import annotations

import math
from pathlib import Path

from sdlora.kohya_import.rules import (INVALID, MAPPED, NO_EFFECT, OFF, UNKNOWN, UNSUPPORTED, Builder, Invalid, Row,
                                       Unmappable, as_bool, as_float, as_int, as_str)
from sdlora.onetrainer_import.read import flatten

AUGMENTATIONS = ("rotate", "brightness", "contrast", "saturation", "hue")
IMAGE_NOTHING = {"enable_fixed_flip": "sdlora has no fixed (always) flip",
                 "enable_random_circular_mask_shrink": "sdlora has no mask augmentation",
                 "enable_random_mask_rotate_crop": "sdlora has no mask augmentation"}
for _a in AUGMENTATIONS:
    IMAGE_NOTHING[f"enable_random_{_a}"] = f"sdlora has no {_a} augmentation"
    IMAGE_NOTHING[f"enable_fixed_{_a}"] = f"sdlora has no {_a} augmentation"
READ_WITH = {"random_rotate_max_angle": "enable_random_rotate"}
for _a in AUGMENTATIONS[1:]:
    READ_WITH[f"random_{_a}_max_strength"] = f"enable_random_{_a}"
TEXT_OFF_UNLESS = {"tag_dropout_special_tags": "", "tag_dropout_special_tags_mode": "NONE",
                   "tag_dropout_special_tags_regex": False, "caps_randomize_enable": False}
SAMPLE_FIELDS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "width": "width", "height": "height",
                 "seed": "seed", "diffusion_steps": "num_inference_steps", "cfg_scale": "guidance_scale"}
SAMPLE_DEFAULTS = {"frames": 1, "length": 10.0, "text_encoder_1_layer_skip": 0, "text_encoder_2_layer_skip": 0,
                   "text_encoder_3_layer_skip": 0, "text_encoder_4_layer_skip": 0, "text_encoder_1_sequence_length": None,
                   "text_encoder_2_sequence_length": None, "transformer_attention_mask": False,
                   "force_last_timestep": False, "sample_inpainting": False, "base_image_path": "",
                   "mask_image_path": ""}


def resolutions(v) -> int | list[int]:
    """OneTrainer's resolution text: "512", or several base resolutions "512,768" (each bucketed); Invalid else."""
    text = as_str(v).replace(" ", "")
    if "x" in text.lower():
        raise Unmappable(f"{text!r}: sdlora's resolutions are square base resolutions (data.resolution), not WxH")
    try:
        values = [int(p) for p in text.split(",") if p]
    except ValueError:
        raise Invalid(f"{v!r} is not a resolution (512) or a comma-separated list (512,768)") from None
    if not values:
        raise Invalid(f"{v!r} is empty")
    return values[0] if len(values) == 1 else values


def _images_in(folder: str) -> int | None:
    from sdlora.data.images import IMAGE_EXTENSIONS

    p = Path(folder).expanduser()
    if not p.is_dir():
        return None
    return sum(1 for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)


def concepts(items: list, where: str, b: Builder, rows: list[Row]) -> None:
    """Each concept's fields as rows; STANDARD concepts become `data.subsets`, a VALIDATION one `validation.path`.
    Leaves b.state["samples_per_epoch"] (images x repeats of the counted concepts) or b.state["count_problem"]."""
    subsets, flips, crops, samples, problem = [], set(), set(), 0, None
    for i, concept in enumerate(items):
        name = f"{where}.{i}"
        if not isinstance(concept, dict):
            rows.append(Row(name, concept, INVALID, "not imported: a concept is an object"))
            continue
        fields = flatten(concept)
        if not as_bool_or(concept.get("enabled", True), True):
            rows += [Row(f"{name}.{k}", v, OFF, "the concept is disabled") for k, v in fields]
            continue
        kind = as_str(concept.get("type", "STANDARD")).upper()
        subset: dict = {}
        for key, value in fields:
            rows.append(_concept_row(f"{name}.{key}", key, value, concept, kind, subset, b))
        if "path" not in subset:
            continue
        if kind == "VALIDATION":
            if b.get("validation.path") is None:
                b.set("validation.path", subset["path"])
            continue
        if kind != "STANDARD":
            continue
        flips.add(bool(concept.get("image", {}).get("enable_random_flip", False)))
        crops.add(bool(concept.get("image", {}).get("enable_crop_jitter", True)))
        subsets.append(subset)
        n = _images_in(subset["path"])
        if n is None:
            problem = problem or f"{subset['path']} is not a folder here"
        else:
            samples += round(n * subset.pop("_share", subset.get("repeats", 1)))
        subset.pop("_share", None)
    if subsets:
        b.set("data.subsets", subsets)
    if True in flips:
        b.set("data.flip", True)
    if True in crops:
        b.set("data.crop", "random")
    for what, values, key in (("random flip", flips, "data.flip"), ("crop jitter", crops, "data.crop")):
        if len(values) > 1:
            b.notes.append(f"concepts differ in {what}; sdlora has one {key} for the run: on, as in some of them")
    if problem or not subsets:
        b.state["count_problem"] = problem or "no enabled STANDARD concept"
    else:
        b.state["samples_per_epoch"] = samples


def as_bool_or(value, default: bool) -> bool:
    try:
        return as_bool(value)
    except Invalid:
        return default


def _concept_row(shown: str, key: str, value, concept: dict, kind: str, subset: dict, b: Builder) -> Row:
    try:
        status, detail = _concept_field(key, value, concept, kind, subset, b)
    except Invalid as e:
        return Row(shown, value, INVALID, f"not imported: {e}")
    return Row(shown, value, status, detail)


def _concept_field(key: str, value, concept: dict, kind: str, subset: dict, b: Builder) -> tuple[str, str]:
    text = concept.get("text", {}) if isinstance(concept.get("text"), dict) else {}
    if key == "path":
        subset["path"] = as_str(value)
        where = "validation.path" if kind == "VALIDATION" else "data.subsets[].path"
        return (MAPPED, where) if kind in ("STANDARD", "VALIDATION") else (OFF, f"a {kind} concept (see its type)")
    if key == "type":
        if kind == "STANDARD":
            return MAPPED, "a data.subsets entry"
        if kind == "VALIDATION":
            return MAPPED, "validation.path (sdlora holds out one folder)"
        if kind == "PRIOR_PREDICTION":
            return UNSUPPORTED, ("sdlora has no prior-prediction concept (the base model's prediction as the "
                                 "target); reg.preservation is its nearest option")
        raise Invalid(f"{value!r} is not STANDARD, VALIDATION or PRIOR_PREDICTION")
    if kind not in ("STANDARD",) and key not in ("name", "enabled", "seed", "concept_stats"):
        return OFF, f"not read for a {kind} concept" if kind != "VALIDATION" else "sdlora validates the folder as is"
    if key in ("name", "concept_stats"):
        return NO_EFFECT, "a label / OneTrainer's counts of the folder"
    if key == "enabled":
        return MAPPED, "enabled"
    if key == "seed":
        return NO_EFFECT, "OneTrainer's per-concept seed; sdlora draws from train.seed"
    if key == "include_subdirectories":
        return (UNSUPPORTED, "sdlora reads the folder's own images (and kohya-style N_name subfolders)") \
            if as_bool(value) else (OFF, "false")
    if key in ("image_variations", "text_variations"):
        return (OFF, "1") if as_int(value) == 1 else \
            (NO_EFFECT, "OneTrainer caches this many variants; sdlora augments and draws a caption at each use")
    if key == "balancing":
        return _balancing(value, as_str(concept.get("balancing_strategy", "REPEATS")).upper(), subset)
    if key == "balancing_strategy":
        return MAPPED, "read with balancing (see its row)"
    if key == "loss_weight":
        return (OFF, "1") if as_float(value) == 1 else \
            (UNSUPPORTED, "sdlora weights the loss per subset only for regularisation images (data.prior_loss_weight)")
    if key.startswith("image."):
        return _image_field(key[6:], value, concept.get("image", {}), subset)
    if key.startswith("text."):
        return _text_field(key[5:], value, text, subset)
    return UNKNOWN, "not a field of OneTrainer's ConceptConfig: not imported"


def _balancing(value, strategy: str, subset: dict) -> tuple[str, str]:
    share = as_float(value)
    if strategy != "REPEATS":
        subset["repeats"] = 1
        return UNSUPPORTED, (f"balancing_strategy {strategy}: sdlora counts repeats per image, not samples per "
                             "concept; repeats 1 written")
    repeats = max(1, round(share))
    subset["repeats"], subset["_share"] = repeats, share
    if repeats != share:
        return UNSUPPORTED, f"sdlora's repeats are whole numbers >= 1: repeats {repeats} written"
    return MAPPED, f"data.subsets[].repeats = {repeats}"


def _image_field(key: str, value, image: dict, subset: dict) -> tuple[str, str]:
    if key == "enable_resolution_override":
        return (MAPPED, "see resolution_override") if as_bool(value) else (OFF, "false: data.resolution")
    if key == "resolution_override":
        if not as_bool_or(image.get("enable_resolution_override"), False):
            return OFF, "only with enable_resolution_override"
        try:
            subset["resolution"] = resolutions(value)
        except Unmappable as e:
            return UNSUPPORTED, str(e)
        return MAPPED, "data.subsets[].resolution"
    if key == "enable_crop_jitter":
        return (MAPPED, "data.crop = random") if as_bool(value) else (OFF, "center crops, sdlora's default")
    if key == "enable_random_flip":
        return (MAPPED, "data.flip") if as_bool(value) else (OFF, "false")
    if key in IMAGE_NOTHING:
        return (UNSUPPORTED, IMAGE_NOTHING[key]) if as_bool(value) else (OFF, "false")
    if key in READ_WITH:
        return (UNSUPPORTED, f"with {READ_WITH[key]} (see its row)") if image.get(READ_WITH[key]) else \
            (OFF, f"only with {READ_WITH[key]}")
    return UNKNOWN, "not a field of OneTrainer's ConceptImageConfig: not imported"


def _text_field(key: str, value, text: dict, subset: dict) -> tuple[str, str]:
    shuffle, dropout = as_bool_or(text.get("enable_tag_shuffling"), False), as_bool_or(text.get("tag_dropout_enable"), False)
    if key == "prompt_source":
        source = as_str(value)
        if source == "sample":
            subset.update(caption_extension=".txt", multiline_captions=True)
            return MAPPED, "caption_extension .txt, multiline_captions (one line drawn per use, as OneTrainer)"
        if source == "concept":
            return UNSUPPORTED, ("one prompt file for the whole concept (text.prompt_path): not read, a path chosen "
                                 "by the file; sdlora reads a caption beside each image")
        if source == "filename":
            return UNSUPPORTED, "sdlora captions from a file beside each image (or class_caption), not its file name"
        raise Invalid(f"{value!r} is not sample, concept or filename")
    if key == "prompt_path":
        return (OFF, "empty") if not as_str(value) else (NO_EFFECT, "only with prompt_source concept (see its row)")
    if key == "enable_tag_shuffling":
        if as_bool(value):
            subset["shuffle_tags"] = True
            return MAPPED, "data.subsets[].shuffle_tags"
        return OFF, "false"
    if key == "tag_delimiter":
        return (OFF, "comma, as sdlora") if as_str(value).strip() == "," else \
            (UNSUPPORTED, "sdlora's tags are comma-separated") if shuffle or dropout else (OFF, "no shuffle or dropout")
    if key == "keep_tags_count":
        if not (shuffle or dropout):
            return OFF, "no shuffle or dropout"
        subset["keep_tokens"] = as_int(value)
        return MAPPED, "data.subsets[].keep_tokens"
    if key == "tag_dropout_enable":
        return (MAPPED, "see tag_dropout_mode / tag_dropout_probability") if as_bool(value) else (OFF, "false")
    if key == "tag_dropout_mode":
        return (MAPPED, "read with tag_dropout_probability") if dropout else (OFF, "tag dropout is off")
    if key == "tag_dropout_probability":
        if not dropout or as_float(value) == 0:
            return OFF, "tag dropout is off"
        mode = as_str(text.get("tag_dropout_mode", "FULL")).upper()
        if mode == "RANDOM":
            subset["tag_dropout"] = as_float(value)
            return MAPPED, "data.subsets[].tag_dropout (each tag after the kept ones)"
        if mode == "FULL" and as_int(text.get("keep_tags_count", 1)) == 0:
            subset["caption_dropout"] = as_float(value)
            return MAPPED, "data.subsets[].caption_dropout (FULL with no kept tags: the whole caption)"
        return UNSUPPORTED, (f"tag_dropout_mode {mode}: sdlora drops each tag (RANDOM) or the whole caption "
                             "(FULL with keep_tags_count 0)")
    if key in TEXT_OFF_UNLESS:
        return (OFF, "off") if value == TEXT_OFF_UNLESS[key] or value in (None, "", False) else \
            (UNSUPPORTED, "sdlora has no special-tag dropout or capitalisation randomising")
    if key.startswith("caps_randomize_"):
        return (OFF, "caps_randomize_enable is off") if not as_bool_or(text.get("caps_randomize_enable"), False) else \
            (UNSUPPORTED, "sdlora has no capitalisation randomising")
    return UNKNOWN, "not a field of OneTrainer's ConceptTextConfig: not imported"


def steps_per_epoch(b: Builder) -> tuple[int | None, str]:
    """OneTrainer's epoch in optimiser steps, about: every concept's images x balancing once, in batches of
    train.batch_size, over gradient_accumulation_steps (one bucket assumed)."""
    if "samples_per_epoch" not in b.state:
        return None, b.state.get("count_problem", "the concepts were not read")
    samples = b.state["samples_per_epoch"]
    if samples == 0:
        return None, "no images in the concept folders"
    batch, accum = b.get("train.batch_size", 1), b.get("train.gradient_accumulation_steps", 1)
    steps = max(1, math.ceil(math.ceil(samples / batch) / accum))
    return steps, (f"{samples} images with repeats / batch {batch}" + (f" / accumulation {accum}" if accum > 1 else "")
                   + f" = {steps} steps per epoch")


def samples(items: list, where: str, b: Builder, rows: list[Row]) -> None:
    """Each enabled sample -> one `sample.entries` mapping; its fields as rows."""
    entries = []
    for i, sample in enumerate(items):
        name = f"{where}.{i}"
        if not isinstance(sample, dict):
            rows.append(Row(name, sample, INVALID, "not imported: a sample is an object"))
            continue
        if not as_bool_or(sample.get("enabled", True), True):
            rows += [Row(f"{name}.{k}", v, OFF, "the sample is disabled") for k, v in sample.items()]
            continue
        entry: dict = {}
        for key, value in sample.items():
            rows.append(_sample_row(f"{name}.{key}", key, value, sample, entry, bool(b.state.get("flow"))))
        if entry.get("prompt", "").strip():
            entries.append(entry)
    if entries:
        b.set("sample.entries", entries)


def _sample_row(shown: str, key: str, value, sample: dict, entry: dict, flow: bool) -> Row:
    try:
        if key in SAMPLE_FIELDS:
            read = {"width": as_int, "height": as_int, "seed": as_int, "diffusion_steps": as_int,
                    "cfg_scale": as_float}.get(key, as_str)
            entry[SAMPLE_FIELDS[key]] = read(value)
            if key == "seed" and as_bool_or(sample.get("random_seed"), False):
                del entry["seed"]
                return Row(shown, value, OFF, "random_seed is on (see its row)")
            return Row(shown, value, MAPPED, f"sample.entries[].{SAMPLE_FIELDS[key]}")
        if key == "enabled":
            return Row(shown, value, MAPPED, "enabled")
        if key == "random_seed":
            return Row(shown, value, UNSUPPORTED, "sdlora samples with a fixed seed (sample.seed when unset)") \
                if as_bool(value) else Row(shown, value, OFF, "false")
        if key == "noise_scheduler":
            if flow:  # OneTrainer's SD3 sampler, like sdlora's, uses the model's flow-matching Euler scheduler
                return Row(shown, value, NO_EFFECT, "SD3 samples with its flow-matching Euler scheduler")
            return Row(shown, value, OFF, "DDIM, as sdlora") if as_str(value).upper() == "DDIM" else \
                Row(shown, value, UNSUPPORTED, "sdlora samples SD 1.x/2.x/SDXL with DDIM (eta 0)")
        if key in SAMPLE_DEFAULTS:
            return Row(shown, value, OFF, "OneTrainer's default") if value == SAMPLE_DEFAULTS[key] else \
                Row(shown, value, UNSUPPORTED, "sdlora's samples use the run's text-encoder settings, one frame, "
                                               "no inpainting")
    except Invalid as e:
        return Row(shown, value, INVALID, f"not imported: {e}")
    return Row(shown, value, UNKNOWN, "not a field of OneTrainer's SampleConfig: not imported")
