"""A setting that cannot work is refused before any work: NaN and ±inf in every float of the config schema and in every
float argument of the command line are one line, exit 2 (issue 25, section 4)."""

import argparse
import math
import typing

import pytest
from pydantic import BaseModel

from sdlora.cli import build_parser
from sdlora.cli import main as cli_main
from sdlora.config import Config, load_config, validate
from sdlora.errors import UserError

NON_FINITE = ["nan", "inf", "-inf"]


def _has_float(annotation) -> bool:
    return annotation is float or any(_has_float(a) for a in typing.get_args(annotation))


def _section(annotation):
    """The Section class a field holds (itself, Optional, or a list of them), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((s for a in typing.get_args(annotation) if (s := _section(a)) is not None), None)


def float_keys(model=Config, prefix=""):
    """Every float-valued key of the schema, as (dotted path with [0] for list items, annotation)."""
    for name, f in model.model_fields.items():
        sub = _section(f.annotation)
        if sub is not None:
            is_list = typing.get_origin(f.annotation) is list or any(
                typing.get_origin(a) is list for a in typing.get_args(f.annotation))
            yield from float_keys(sub, f"{prefix}{name}{'[0]' if is_list else ''}.")
        elif _has_float(f.annotation):
            yield f"{prefix}{name}", f.annotation


FLOAT_KEYS = dict(float_keys())


def base_config(tmp_path) -> dict:
    return {"model": {"path": str(tmp_path)}, "data": {"path": str(tmp_path)}, "output": {"dir": str(tmp_path / "o")}}


LIST_ITEM_REQUIRED = {"subsets": {"path": "d"}, "lr_rules": {"match": "unet"}, "entries": {"prompt": "a cat"}}


def with_value(data: dict, key: str, value) -> dict:
    """`data` with `key` (dotted; `name[0]` is the first item of a list, created with its required keys) set."""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        if part.endswith("[0]"):
            part = part[:-3]
            node = node.setdefault(part, [{}])[0]
            node.update(LIST_ITEM_REQUIRED[part])  # a new list of the schema: add its items' required keys here
            if part == "subsets":
                data["data"].pop("path", None)
        else:
            node = node.setdefault(part, {})
    leaf = parts[-1]
    origin = typing.get_origin(FLOAT_KEYS[key])
    node[leaf] = [value, 0.5] if origin is tuple else {"text_encoder": value} if origin is dict else value
    return data


def test_the_schema_walk_finds_the_floats():
    assert {"lora.alpha", "optim.lr", "optim.betas", "optim.lr_rules[0].lr", "data.subsets[0].caption_dropout"} <= \
        set(FLOAT_KEYS), sorted(FLOAT_KEYS)


@pytest.mark.parametrize("key", sorted(FLOAT_KEYS))
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_every_float_setting_refuses_non_finite_values(key, value, tmp_path):
    with pytest.raises(UserError) as info:
        validate(with_value(base_config(tmp_path), key, value))
    message = str(info.value)
    assert "\n" not in message and key.split(".")[-1] in message and "finite" in message, message


@pytest.mark.parametrize("text", [".nan", ".inf", "-.inf", ".NaN"])
def test_yaml_non_finite_numbers_are_refused(text, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{path: {tmp_path}}}\ndata: {{path: {tmp_path}}}\noutput: {{dir: {tmp_path}/o}}\n"
                      f"optim: {{lr: {text}}}\n")
    with pytest.raises(UserError, match=r"optim\.lr.*finite"):
        load_config(config)


@pytest.mark.parametrize("override", ["lora.alpha=nan", "optim.lr=inf", "lora.alpha=NaN", "optim.lr=-Infinity",
                                      "optim.lr=.inf"])
def test_set_non_finite_numbers_are_refused_and_dry_run_never_prints_them(override, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{path: {tmp_path}}}\ndata: {{path: {tmp_path}}}\noutput: {{dir: {tmp_path}/o}}\n")
    capsys.readouterr()
    assert cli_main(["train", "--config", str(config), "--set", override, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "finite" in err and override.split("=")[0] in err, err


# ------------------------------------------------------------------------------------------ command line
def float_arguments():
    """(command, action, the group it must satisfy) for every float-typed argument of every command."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command, p in sub.choices.items():
        for action in p._actions:
            if action.type is not None and getattr(action.type, "__name__", "") in ("float", "finite_float"):
                yield command, p, action


def minimal_argv(command, p, tested):
    """The command's required arguments with plausible values, then `tested`."""
    argv = [command]
    for action in p._actions:
        if action is tested or not (action.required or not action.option_strings) or isinstance(action, argparse._HelpAction):
            continue
        value = action.choices[0] if action.choices else "1" if action.type is not None else "x.safetensors"
        argv += ([value] if not action.option_strings else [action.option_strings[0], value])
    for group in p._mutually_exclusive_groups:
        if group.required and tested not in group._group_actions:
            argv += [group._group_actions[0].option_strings[0], "1"]
    return argv


FLOAT_ARGUMENTS = {f"{c} {a.option_strings[0]}": (c, p, a) for c, p, a in float_arguments()}


def test_the_parser_walk_finds_the_float_arguments():
    assert {"resize --rank", "resize --sv-ratio", "merge --weights", "extract --min-diff", "inspect --epsilon",
            "inspect --mitigate-intruders"} <= set(FLOAT_ARGUMENTS), sorted(FLOAT_ARGUMENTS)


@pytest.mark.parametrize("name", sorted(FLOAT_ARGUMENTS))
@pytest.mark.parametrize("value", NON_FINITE)
def test_every_float_argument_refuses_non_finite_values_in_one_line(name, value, capsys):
    command, p, action = FLOAT_ARGUMENTS[name]
    argv = minimal_argv(command, p, action) + [f"{action.option_strings[0]}={value}"]  # '-inf' alone reads as an option
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1 and "finite" in err, (argv, err)


@pytest.mark.parametrize("value", NON_FINITE)
def test_a_sample_prompt_files_guidance_scale_is_finite(value):
    """sample.prompts_file's numbers are settings too (kohya's --l guidance scale)."""
    from sdlora.training.sample_prompts import parse_prompt_line

    with pytest.raises(UserError, match="finite") as info:
        parse_prompt_line(f"a cat --l {value}", "prompts.txt line 1")
    assert "prompts.txt line 1" in str(info.value) and "\n" not in str(info.value)
