"""The samples a run draws: `sample.prompts` (the shared settings), `sample.entries` (each with its own) and
`sample.prompts_file` (kohya's prompt-file format), resolved to one complete `SamplePrompt` each.

kohya's format (sd-scripts library/train_util.py line_to_prompt_dict; gen_img's options): one prompt a line, `#`
starts a comment line, options after ` --`: `--n` negative prompt, `--w` width, `--h` height, `--d` seed, `--l`
guidance (CFG) scale, `--s` steps. An option sdlora cannot honour (kohya's `--ss` sampler, `--g`, ControlNet ...)
is a one-line error naming the file and line, not silently dropped.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from sdlora.errors import UserError

# kohya's option letter -> (sdlora field, reader)
KOHYA_OPTIONS = {"n": ("negative_prompt", str), "w": ("width", int), "h": ("height", int), "d": ("seed", int),
                 "l": ("guidance_scale", float), "s": ("num_inference_steps", int)}
_OPTION = re.compile(r"^(\w+)\s+(.*)$", re.S)


@dataclass(frozen=True)
class PromptLine:
    """One prompt with the settings it gives (None: the sample.* value)."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    guidance_scale: float | None = None
    num_inference_steps: int | None = None

    def as_config(self) -> dict:
        """As an entry of `sample.entries` (unset fields left out)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class SamplePrompt:
    """Everything one sample is drawn with: sizes in pixels, `steps` denoising steps of DDIM."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    seed: int
    guidance_scale: float
    steps: int


def parse_prompt_line(line: str, where: str) -> PromptLine:
    """One line of a kohya prompt file; `where` names it in errors (`prompts.txt line 3`)."""
    prompt, *options = line.split(" --")
    fields: dict = {}
    for option in options:
        m = _OPTION.match(option.strip())
        letter = m.group(1).lower() if m else option.strip()
        if m is None or letter not in KOHYA_OPTIONS:
            allowed = ", ".join(f"--{k}" for k in KOHYA_OPTIONS)
            raise UserError(f"{where}: option --{option.strip()!s} is not one sdlora reads (allowed: {allowed})")
        name, read = KOHYA_OPTIONS[letter]
        try:
            value = read(m.group(2).strip())
        except ValueError:
            raise UserError(f"{where}: --{letter} {m.group(2).strip()!r} is not a {read.__name__}") from None
        _check(name, value, where)
        fields[name] = value
    if not prompt.strip():
        raise UserError(f"{where}: the prompt is blank (text comes before the first --option)")
    return PromptLine(prompt.strip(), **fields)


def _check(name: str, value, where: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{where}: {name} {value} is not a finite number")
    if name in ("width", "height") and (value < 64 or value % 8):
        raise UserError(f"{where}: {name} {value} must be at least 64 and a multiple of 8")
    if name == "num_inference_steps" and not 1 <= value <= 1000:
        raise UserError(f"{where}: steps {value} must be between 1 and 1000")
    if name in ("seed", "guidance_scale") and value < 0:
        raise UserError(f"{where}: {name} {value} must not be negative")


def parse_prompt_lines(lines: list[str], source: str) -> list[PromptLine]:
    """Every non-blank, non-comment line of a kohya prompt file."""
    out = []
    for number, line in enumerate(lines, start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            out.append(parse_prompt_line(line.strip(), f"{source} line {number}"))
    return out


def read_prompts_file(path: str) -> list[PromptLine]:
    """`sample.prompts_file`: missing, unreadable, malformed or empty is a one-line UserError."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"sample.prompts_file: cannot read {path}: {e}") from None
    lines = parse_prompt_lines(text.splitlines(), f"sample.prompts_file {path}")
    if not lines:
        raise UserError(f"sample.prompts_file: {path} has no prompts (one a line)")
    return lines


def sample_prompts(cfg) -> list[SamplePrompt]:
    """Every sample of a sampling step, in order: sample.prompts, sample.entries, then the prompts file's lines; each
    field a prompt leaves unset takes the sample.* value (sizes: the largest base resolution, Config.top_resolution)."""
    s = cfg.sample
    lines = [PromptLine(p) for p in s.prompts]
    lines += [PromptLine(**e.model_dump()) for e in s.entries]
    if s.prompts_file:
        lines += read_prompts_file(s.prompts_file)

    def pick(value, default):
        return default if value is None else value

    side = cfg.top_resolution()
    return [SamplePrompt(prompt=p.prompt, negative_prompt=pick(p.negative_prompt, s.negative_prompt),
                         width=pick(p.width, s.width or side),
                         height=pick(p.height, s.height or side), seed=pick(p.seed, s.seed),
                         guidance_scale=pick(p.guidance_scale, s.guidance_scale),
                         steps=pick(p.num_inference_steps, s.num_inference_steps)) for p in lines]
