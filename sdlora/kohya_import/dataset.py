"""kohya's data options as `data.*` and `data.subsets`: the DreamBooth folder options (`train_data_dir`,
`reg_data_dir`) or a `--dataset_config` file (`[general]`, `[[datasets]]`, `[[datasets.subsets]]`; kohya's
docs/config_README-en.md), with kohya's layering: an option set lower (subset < dataset < general < the training
config) is the default of the levels above it.

Each (place, option) of the input is converted once and is one row; its sdlora keys are then layered the same way.
sdlora has one value of some options for all subsets (flip, crop, buckets): two places giving them different
values is a NOT SUPPORTED row for the second. The resolution is also a subset key: subsets that differ in it each
get their own `data.subsets.N.resolution` (kohya's per-dataset resolution). The images are counted (not opened) so that epoch-based
kohya options can become steps.
"""

from __future__ import annotations

import math
from pathlib import Path

from sdlora.kohya_import.rules import (DEFAULT, INVALID, MAPPED, NO_EFFECT, OFF, UNSUPPORTED, Builder, Invalid, Row, Unmappable,
                                       as_bool, as_float, as_int, as_path, as_str, is_unset)


def _subset(key: str, read):
    return lambda v: ({key: read(v)}, None)


def _data(key: str, read):
    return lambda v: (None, {key: read(v)})


def _off_unless(default, why: str):
    def convert(v):
        if v == default or str(v) == str(default):
            return None, None
        raise Unmappable(why)
    return convert


def _resolution(v):
    parts = v if isinstance(v, list) else [p for p in str(v).replace("x", ",").split(",") if p.strip()]
    sizes = [as_int(p) for p in parts]
    if len(sizes) == 1 or (len(sizes) == 2 and sizes[0] == sizes[1]):
        return None, {"data.resolution": sizes[0]}
    if len(sizes) != 2:
        raise Invalid(f"{v!r}: a size or width,height")
    side = int(math.sqrt(sizes[0] * sizes[1])) // 8 * 8
    return None, {"data.resolution": side, "_note": f"resolution {sizes[0]}x{sizes[1]}: sdlora's buckets have an "
                                                      f"area budget of data.resolution² ({side}² here); without "
                                                      "buckets sdlora trains square images"}


def _bucket_step(v) -> int:
    step = as_int(v)
    if step < 8 or step % 8:
        raise Unmappable(f"{step}: sdlora's bucket sides are multiples of 8 (data.bucket_step); its default 64 is used")
    return step


def _min_side(v):
    """kohya's min_bucket_reso; below sdlora's smallest data.min_side (its schema's bound) that bound is written."""
    from sdlora.config import DataConfig

    floor = next(m.ge for m in DataConfig.model_fields["min_side"].metadata if hasattr(m, "ge"))
    side = as_int(v)
    if side >= floor:
        return None, {"data.min_side": side}
    return None, {"data.min_side": floor, "_unsupported": f"data.min_side = {floor} (sdlora's smallest bucket side; "
                                                          f"kohya's buckets below {floor} are not made)"}


def _cache(kind: str):
    return lambda v: (None, {"data.cache_latents": kind} if as_bool(v) else {})


def _mask_dir(v):
    return None, {"data.mask_dir": as_path(v), "data.masked_loss": True}


# kohya option -> converter(value) -> (subset keys, data keys); None for a key set means "nothing".
RULES = {
    "image_dir": _subset("path", as_path), "num_repeats": _subset("repeats", as_int),
    "is_reg": _subset("is_regularization", as_bool), "class_tokens": _subset("class_caption", as_str),
    "caption_extension": _subset("caption_extension", as_str), "caption_extention": _subset("caption_extension", as_str),
    "shuffle_caption": _subset("shuffle_tags", as_bool), "keep_tokens": _subset("keep_tokens", as_int),
    "caption_prefix": _subset("prefix", as_str), "caption_suffix": _subset("suffix", as_str),
    "caption_dropout_rate": _subset("caption_dropout", as_float),
    "caption_tag_dropout_rate": _subset("tag_dropout", as_float),
    "caption_separator": _off_unless(",", "sdlora splits tags at commas only"),
    "keep_tokens_separator": _off_unless("", "sdlora keeps the first keep_tokens tags, no separator"),
    "secondary_separator": _off_unless("", "sdlora splits tags at commas only"),
    "enable_wildcard": lambda v: ({"wildcards": as_bool(v), "multiline_captions": as_bool(v)}, None),
    "color_aug": _off_unless(False, "sdlora has no colour augmentation"),
    "face_crop_aug_range": _off_unless(None, "sdlora has no face-crop augmentation"),
    "token_warmup_min": _off_unless(1, "sdlora has no caption token warm-up"),
    "token_warmup_step": _off_unless(0, "sdlora has no caption token warm-up"),
    "caption_dropout_every_n_epochs": _off_unless(0, "sdlora drops captions by probability (caption_dropout) only"),
    "resize_interpolation": _off_unless("lanczos", "sdlora resizes with Lanczos"),
    "custom_attributes": _off_unless({}, "kohya's custom attributes have no sdlora meaning"),
    "metadata_file": _off_unless(None, "kohya's fine-tuning JSON: write a metadata.jsonl (file_name, text) instead"),
    "in_json": _off_unless(None, "kohya's fine-tuning JSON: write a metadata.jsonl (file_name, text) instead"),
    "dataset_repeats": _off_unless(1, "only with in_json (fine-tuning metadata)"),
    "network_multiplier": _off_unless(1.0, "sdlora trains every subset at multiplier 1"),
    "dataset_class": _off_unless(None, "a custom dataset class is code, not configuration"),
    "flip_aug": _data("data.flip", as_bool),
    "random_crop": lambda v: (None, {"data.crop": "random" if as_bool(v) else "center"}),
    "alpha_mask": lambda v: (None, {"data.masked_loss": True} if as_bool(v) else {}),
    "masked_loss": lambda v: (None, {"data.masked_loss": True} if as_bool(v) else {}),
    "conditioning_data_dir": _mask_dir,
    "resolution": _resolution, "enable_bucket": _data("data.bucketing", as_bool),
    "min_bucket_reso": _min_side, "max_bucket_reso": _data("data.max_side", as_int),
    "bucket_reso_steps": lambda v: (None, {"data.bucket_step": _bucket_step(v)}), "bucket_no_upscale": _data("data.no_upscale", as_bool),
    "batch_size": _data("train.batch_size", as_int), "prior_loss_weight": _data("data.prior_loss_weight", as_float),
    "cache_latents": _cache("memory"), "cache_latents_to_disk": _cache("disk"),
}
NO_EFFECT_HERE = {"cache_info": "speed only", "debug_dataset": "kohya's dataset viewer",
                  "validation_seed": "set validation.seed at the top level", "validation_split": "set at the top level"}
# The training config's options that are dataset options (the lowest layer of kohya's layering).
DATA = set(RULES) | {"train_data_dir", "reg_data_dir", "dataset_config"} - {"image_dir", "is_reg", "class_tokens",
                                                                           "metadata_file", "batch_size"}
KOHYA_DATA_DEFAULTS = {"caption_extension": ".caption", "enable_bucket": False}
PER_SUBSET = {"data.resolution": "resolution"}  # data keys a subset may also set for itself


def convert_data(top: dict, dataset_file: dict | None, b: Builder, rows: list[Row], names: dict | None = None) -> None:
    """`top`: the training config's options (kohya names; `names` gives the name the input showed for each);
    `dataset_file`: the parsed --dataset_config, if any.
    Writes data.* / data.subsets / train.batch_size into `b` and one row per (place, option) into `rows`."""
    shared = [("(kohya default) ", {k: v for k, v in KOHYA_DATA_DEFAULTS.items() if k not in top}, DEFAULT),
              ("", {k: v for k, v in top.items() if k in DATA - {"train_data_dir", "reg_data_dir", "dataset_config"}},
               None)]
    subsets: list[tuple[dict, list]] = []  # (keys set directly, [(place, options)] from lowest to highest)
    if dataset_file is not None:
        for k in ("train_data_dir", "reg_data_dir"):
            if k in top and not is_unset(top[k]):
                rows.append(Row((names or {}).get(k, k), top[k], OFF, "kohya ignores it when a dataset config is given"))
        general = dataset_file.get("general", {})
        for i, ds in enumerate(dataset_file.get("datasets", [])):
            ds_opts = {k: v for k, v in ds.items() if k != "subsets"}
            for j, sub in enumerate(ds.get("subsets", [])):
                subsets.append(({}, [("general.", general), (f"datasets.{i}.", ds_opts),
                                     (f"datasets.{i}.subsets.{j}.", sub)]))
        for k in sorted(set(dataset_file) - {"general", "datasets"}):
            rows.append(Row(k, dataset_file[k], UNSUPPORTED, "not a dataset-config section (general, datasets)"))
        if not subsets:
            raise Unmappable("the dataset config has no [[datasets.subsets]]")
    else:
        for key, is_reg in (("train_data_dir", False), ("reg_data_dir", True)):
            if key in top and not is_unset(top[key]) and not isinstance(top[key], str):
                rows.append(Row((names or {}).get(key, key), top[key], INVALID, "not imported: not a path (text)"))
            elif key in top and not is_unset(top[key]):
                direct = {"path": as_path(top[key])} | ({"is_regularization": True} if is_reg else {})
                rows.append(Row((names or {}).get(key, key), top[key], MAPPED, f"data.subsets.{len(subsets)}.path (a kohya <repeats>_<name> "
                                                      "folder tree" + (", is_regularization" if is_reg else "") + ")"))
                subsets.append((direct, []))
            elif key in top:
                rows.append(Row((names or {}).get(key, key), top[key], OFF, "unset"))
        if not subsets:
            raise Unmappable("no data: give train_data_dir (or --dataset-config)")
    done: dict[str, tuple] = {}  # place + option -> (subset keys, data keys): each place is converted once
    firsts: dict[str, tuple] = {}  # data key -> (value, where it came from), from the first subset
    per_subset: dict[str, list[tuple]] = {}  # a PER_SUBSET data key -> [(subset index, value, where it came from)]
    out = []
    for index, (direct, own) in enumerate(subsets):
        keys, data, origin = dict(direct), {}, {}
        for place, options, status in shared + [(p, o, None) for p, o in own]:
            for name, value in options.items():
                where = place + ((names or {}).get(name, name) if place == "" else name)
                if where not in done:
                    label = f"data.subsets.{index}." if ".subsets." in place else "data.subsets.*."
                    done[where] = _convert(where, name, value, status, label, rows, b)
                sub_keys, data_keys = done[where]
                keys.update(sub_keys)
                for key, val in data_keys.items():  # a higher level overrides a lower one, as in kohya
                    if key == "data.cache_latents" and {data.get(key), val} == {"memory", "disk"}:
                        val = "disk"  # kohya: caching to disk is caching
                    data[key], origin[key] = val, where
        for key, val in data.items():  # sdlora has one value for every subset: the first subset's
            if key in PER_SUBSET:
                per_subset.setdefault(key, []).append((index, val, origin[key]))
                continue
            first = firsts.setdefault(key, (val, origin[key]))
            if first[0] != val:
                row = next(r for r in rows if r.option == origin[key])
                # a value from a shared place (a default, [general], the training config): name the dataset it reached
                scope = next((p[:-1] for p, _ in own if p.count(".") == 2), None)
                scope = f"{scope} takes {val!r} from here: " if scope and not origin[key].startswith(scope) else ""
                row.status, row.detail = UNSUPPORTED, (f"{scope}sdlora has one {key} for every subset ({first[0]!r} "
                                                       f"from {first[1]} is used)")
        if "path" not in keys:  # its image_dir was an invalid value (see its row): kohya needs a folder per subset
            raise Unmappable(f"{own[-1][0] if own else 'subset '}image_dir: no usable folder (a path, as text)")
        out.append(keys)
    for key, (value, _) in firsts.items():
        b.set(key, value)
    for key, given in per_subset.items():
        if len(given) == len(out) and len({v for _, v, _ in given}) == 1:
            b.set(key, given[0][1])  # one value everywhere: the data-wide key
            continue
        for index, value, _ in given:
            out[index][PER_SUBSET[key]] = value
        for where in dict.fromkeys(w for _, _, w in given):
            row = next(r for r in rows if r.option == where)
            reached = ", ".join(f"data.subsets.{i}.{PER_SUBSET[key]}" for i, _, w in given if w == where)
            row.detail = row.detail.replace(key, reached)
    b.set("data.subsets", out)
    _count(out, b)


def _convert(where: str, name: str, value, status, label: str, rows: list[Row], b: Builder) -> tuple[dict, dict]:
    """One (place, option) as its sdlora keys, with its row."""
    if name in NO_EFFECT_HERE:
        rows.append(Row(where, value, NO_EFFECT, NO_EFFECT_HERE[name]))
        return {}, {}
    if name not in RULES:
        rows.append(Row(where, value, UNSUPPORTED, "not a kohya dataset option"))
        return {}, {}
    if is_unset(value) and not name.endswith("separator"):
        rows.append(Row(where, value, OFF, "unset"))
        return {}, {}
    try:
        sub, data = RULES[name](value)
    except Invalid as e:
        rows.append(Row(where, value, "invalid value", f"not imported: {e}"))
        return {}, {}
    except Unmappable as e:
        rows.append(Row(where, value, UNSUPPORTED, str(e)))
        return {}, {}
    sub, data = dict(sub or {}), dict(data or {})
    if "_note" in data:
        b.notes.append(data.pop("_note"))
    if "_unsupported" in data:  # carried as near as sdlora allows: the row says how
        rows.append(Row(where, value, UNSUPPORTED, data.pop("_unsupported")))
        return sub, data
    detail = ", ".join([label + k for k in sub] + list(data))
    rows.append(Row(where, value, status or (MAPPED if detail else OFF), detail or "kohya's default (as sdlora's)"))
    return sub, data


# ------------------------------------------------------------------------------------------- image counts
def _images_in(folder: Path) -> int:
    from sdlora.data.images import IMAGE_EXTENSIONS

    return sum(1 for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _count(subsets: list[dict], b: Builder) -> None:
    """Images (with and without repeats) of the training and regularisation subsets, for epoch -> step options; a
    folder that is missing leaves the counts unknown (and says which)."""
    from sdlora.data.sources import kohya_dirs

    train = reg = plain = 0
    for sub in subsets:
        root = Path(sub.get("path", ""))
        if not root.is_dir():
            b.state["count_problem"] = f"folder {root} not found"
            return
        tree = kohya_dirs(root)
        with_repeats = sum(r * _images_in(d) for d, r, _ in tree) if tree else sub.get("repeats", 1) * _images_in(root)
        if sub.get("is_regularization"):
            reg += with_repeats
        else:
            train += with_repeats
            plain += sum(_images_in(d) for d, _, _ in tree) if tree else _images_in(root)
    b.state.update(train_images=train, reg_images=reg)
    b.options["_train_images"] = plain


def steps_per_epoch(b: Builder) -> tuple[int | None, str]:
    """kohya's epoch in optimiser steps, about: every image with its repeats once (regularisation images: as many as
    training images, kohya's balance), in batches of train.batch_size, over gradient_accumulation_steps. kohya's
    buckets round each bucket up to whole batches; this assumes one bucket."""
    if "train_images" not in b.state:
        return None, b.state.get("count_problem", "the images were not counted")
    train, reg = b.state["train_images"], b.state["reg_images"]
    if train == 0:
        return None, "no training images found"
    batch = b.get("train.batch_size", 1)
    accum = b.get("train.gradient_accumulation_steps", 1)
    images = train * (2 if reg else 1)
    steps = max(1, math.ceil(math.ceil(images / batch) / accum))
    how = f"{train} images with repeats" + (f" + as many regularisation images" if reg else "") + f" / batch {batch}"
    return steps, how + (f" / accumulation {accum}" if accum > 1 else "") + f" = {steps} steps per epoch"
