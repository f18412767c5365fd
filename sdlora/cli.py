"""`sdlora train | demo | make-tiny-model | export | inspect | merge | resize | extract | import-kohya |
import-onetrainer | config-help`.

Bad input (a `UserError`) is one line on stderr and exit code 2; a traceback only with --debug.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from sdlora.errors import UserError


class _Parser(argparse.ArgumentParser):
    """Usage errors (a missing argument, a bad value) are one line and exit 2, as every other bad input."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def finite_float(text: str) -> float:
    """A float argument: NaN and ±inf are refused (a rank, ratio, weight or threshold must be a finite number)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layout", default="diffusers", choices=["diffusers", "kohya"], help="key layout of --out (default diffusers)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    _common(p)


def _fisher_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", help="base model (folder or single file): for --fisher-data, and for DoRA modules")
    p.add_argument("--fisher-samples", type=int, default=32, metavar="N",
                   help="single-example gradients averaged per --fisher-data estimate (default 32)")
    p.add_argument("--config-dir", help="diffusers configs for a single-file --base without them")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sdlora", description="Stable Diffusion LoRA trainer")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a LoRA from a config file")
    p.add_argument("--config", required=True, help="YAML or TOML config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set lora.rank=8 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the adapted modules and rates, then exit")
    p.add_argument("--overwrite", action="store_true", help="replace a finished or running run in output.dir")
    p.add_argument("--resume", metavar="latest|PATH", default=None,
                   help="continue the run from its newest intact checkpoint (latest) or from a checkpoint folder")
    _common(p)

    p = sub.add_parser("demo", help="teach the bundled mini model a new word with a LoRA on CPU; judge base vs adapted")
    p.add_argument("--out", default="sdlora-demo", help="output folder (default: ./sdlora-demo)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: DEMO_STEPS in sdlora/commands/demo.py, 150)")
    _common(p)

    p = sub.add_parser("make-tiny-model", help="write a tiny random SD model (diffusers folder) for tests")
    p.add_argument("dir", help="folder to write the model to (a diffusers folder: model_index.json, unet/ or transformer/, vae/, ...)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    p.add_argument("--variant", default="sd1",
                   choices=["sd1", "sd2", "sd2-v", "sdxl", "sdxl-v", "sd3", "sd3-no-t5", "sd35m", "sd35l"],
                   help="architecture: sd1 (SD 1.x layout), sd2 (SD 2.x layout, epsilon), sd2-v (SD 2.x predicting "
                        "v, as SD 2.x 768 px), sdxl (SDXL: two text encoders), sdxl-v (SDXL predicting v), sd3 (SD3 "
                        "Medium: MMDiT, CLIP-L, CLIP-G, T5), sd3-no-t5 (sd3 without T5), sd35m (SD3.5 Medium: dual "
                        "attention, QK-norm), sd35l (SD3.5 Large: QK-norm); default sd1")
    _common(p)

    p = sub.add_parser("inspect", help="what an adapter did to the model: per-module norms, effective rank, intruders")
    p.add_argument("adapter", help="adapter .safetensors (sdlora native or kohya layout)")
    p.add_argument("--base", help="base model (diffusers folder or single file): needed for |dW|/|W0|, intruders, drift")
    p.add_argument("--compare", metavar="OTHER", help="a second adapter, shown side by side")
    p.add_argument("--out", help="folder for PNG plots and inspect.json; with --mitigate-intruders: the new adapter file")
    p.add_argument("--json", action="store_true", help="print the report as JSON on standard output")
    p.add_argument("--top-k", type=int, default=10, help="top singular vectors of W0+dW checked for intruders (default 10)")
    p.add_argument("--epsilon", type=finite_float, default=0.5, help="intruder if max |cos| with W0's singular vectors < this (0.5)")
    p.add_argument("--mitigate-intruders", type=finite_float, metavar="LAMBDA",
                   help="write --out with every intruder direction scaled by LAMBDA (needs --base)")
    p.add_argument("--overwrite", action="store_true", help="with --mitigate-intruders: replace an existing --out file")
    _common(p)

    p = sub.add_parser("export", help="write a trained adapter as diffusers / kohya files or a merged model")
    p.add_argument("source", help="adapter .safetensors, run folder, or checkpoint folder (checkpoints/step_NNNNNN)")
    p.add_argument("--format", required=True, choices=["diffusers", "kohya", "merged-diffusers", "merged-single-file"])
    p.add_argument("--out", required=True, help="file (.safetensors) or, for merged-diffusers, a folder")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--base", default=None, help="base model for the merged formats (the run's model.path, or another)")
    p.add_argument("--vae", default=None, help="merged formats: the VAE to put in (as model.vae_path; default --base's)")
    p.add_argument("--config-dir", help="merged formats: diffusers configs for a single-file --base without them")
    p.add_argument("--text-encoders", help="merged formats: a diffusers SD3 folder with the text encoders an SD3 "
                                           "single-file --base lacks (as model.text_encoders_path)")
    p.add_argument("--allow-pickle", action="store_true", help="merged formats: allow a .ckpt (pickle) --base or --vae, "
                                                              "which can run arbitrary code (as model.allow_pickle)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--ema", action="store_true", help="from a run or checkpoint folder: its adapter_ema.safetensors "
                                                      "(train.ema) instead of adapter.safetensors")
    _common(p)

    p = sub.add_parser("merge", help="several adapters as one: exact (concat), or at a rank (svd, Fisher-weighted)")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER", help="adapter .safetensors files (native or kohya layout)")
    p.add_argument("--out", required=True, help="the merged adapter (.safetensors)")
    p.add_argument("--weights", nargs="+", type=finite_float, metavar="W", help="one weight per adapter (default: 1 each)")
    p.add_argument("--method", default="concat", choices=["concat", "svd", "fisher"],
                   help="concat: exact, rank = sum of ranks; svd: the weighted sum at --rank; fisher: the per-row "
                        "Fisher-weighted average at --rank (default concat)")
    p.add_argument("--rank", type=int, help="rank of the svd / fisher merge")
    p.add_argument("--fisher-data", nargs="+", metavar="FOLDER|PROMPTS",
                   help="estimate each adapter's row Fisher on this image folder or prompts file (one for all, or "
                        "one per adapter; needs --base) instead of the Fisher stored in the files")
    _fisher_options(p)
    _output_options(p)

    p = sub.add_parser("resize", help="an adapter at a lower rank, fixed or chosen per module (kohya's rules)")
    p.add_argument("adapter", help="adapter .safetensors (native or kohya layout)")
    p.add_argument("--out", required=True, help="the resized adapter (.safetensors)")
    rule = p.add_mutually_exclusive_group(required=True)
    rule.add_argument("--rank", type=finite_float, help="this rank in every module")
    rule.add_argument("--sv-ratio", type=finite_float, metavar="X", help="per module: keep every singular value >= σ_max / X")
    rule.add_argument("--sv-fro", type=finite_float, metavar="X", help="per module: the fewest components keeping share X of |dW|_F")
    rule.add_argument("--sv-cumulative", type=finite_float, metavar="X", help="per module: the fewest components keeping share X of Σσ")
    p.add_argument("--max-rank", type=int, help="with a per-module rule: no module above this rank")
    p.add_argument("--fisher", action="store_true", help="FWSVD: weight each output row by the adapter's row Fisher")
    p.add_argument("--fisher-data", metavar="FOLDER|PROMPTS",
                   help="with --fisher: estimate the row Fisher on this image folder or prompts file (needs --base)")
    _fisher_options(p)
    _output_options(p)

    p = sub.add_parser("extract", help="a LoRA from the difference of two checkpoints (base and fine-tuned)")
    p.add_argument("--base", required=True, help="the base model (diffusers folder or single file)")
    p.add_argument("--tuned", required=True, help="the fine-tuned model (diffusers folder or single file)")
    p.add_argument("--rank", required=True, type=int, help="rank of every extracted module")
    p.add_argument("--out", required=True, help="the extracted adapter (.safetensors)")
    p.add_argument("--conv", action="store_true", help="also the UNet's 3x3 convolutions (resnets, down/upsamplers)")
    p.add_argument("--conv-rank", type=int, help="rank of the 3x3 convolutions (default: --rank)")
    p.add_argument("--min-diff", type=finite_float, default=0.0, metavar="X",
                   help="leave out modules with |dW|_F <= X * |W0|_F (default 0: only unchanged modules)")
    p.add_argument("--config-dir", help="diffusers configs for single files without them (as model.config_dir)")
    _output_options(p)

    p = sub.add_parser("import-kohya", help="a kohya-ss config (TOML), command line or kohya_ss GUI JSON as an sdlora "
                                            "config, with a table of every option")
    p.add_argument("config", help="kohya --config_file TOML, the kohya_ss GUI's saved JSON, or a script / text file "
                                  "holding the train_network.py command line (.sh .bat .cmd .ps1 .txt)")
    p.add_argument("--dataset-config", metavar="DATASET", help="kohya --dataset_config TOML/JSON (default: the one the "
                                                               "config names, if any)")
    p.add_argument("--out", required=True, help="the sdlora config to write (.yaml)")
    p.add_argument("--sdxl", action="store_true", help="the config is for sdxl_train_network.py (block weights use "
                                                        "SDXL's layout; the GUI JSON says so itself)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    _common(p)

    p = sub.add_parser("import-onetrainer", help="a OneTrainer training config (JSON) as an sdlora config, with a "
                                                 "table of every option")
    p.add_argument("config", help="the training config OneTrainer saved (JSON)")
    p.add_argument("--concepts", metavar="CONCEPTS", help="the concept file (JSON) the config names in "
                                                          "concept_file_name, when its concepts are not inline")
    p.add_argument("--samples", metavar="SAMPLES", help="the sample file (JSON) the config names in "
                                                        "sample_definition_file_name, when its samples are not inline")
    p.add_argument("--out", required=True, help="the sdlora config to write (.yaml)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    _common(p)

    p = sub.add_parser("config-help", help="list every config key with its default and meaning")
    _common(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = _expand_home(build_parser().parse_args(argv))
    try:
        return _dispatch(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


def _expand_home(args: argparse.Namespace) -> argparse.Namespace:
    """A leading `~` in any argument is the user's home (a shell leaves `--out=~/x` or a quoted '~/x' as it is);
    every string argument that starts with `~` is a path (a --set KEY=VALUE's path is expanded by the config)."""
    def expand(v):
        if isinstance(v, str) and v.startswith("~"):
            return os.path.expanduser(v)
        return [expand(x) for x in v] if isinstance(v, list) else v

    for name, value in vars(args).items():
        setattr(args, name, expand(value))
    return args


def _stopped(e) -> int:
    """A run stopped by SIGINT/SIGTERM: one line (what was saved, how to resume), exit 128 + signal."""
    print(f"sdlora: {e}", file=sys.stderr)
    return e.exit_code


def _dispatch(args) -> int:
    if args.command == "train":
        from sdlora.config import load_config
        from sdlora.training.loop import train
        from sdlora.training.signals import TrainingInterrupted

        cfg = load_config(args.config, args.overrides)
        try:
            train(cfg, overwrite=args.overwrite, resume=args.resume, dry_run=args.dry_run)
        except TrainingInterrupted as e:  # not an error: the state is saved and the message says how to resume
            return _stopped(e)
        except KeyboardInterrupt:  # a second Ctrl-C: stopped at once; every file is atomic, so no checkpoint is torn
            print("sdlora: stopped at once by a second Ctrl-C; resume from the newest intact checkpoint with: "
                  f"sdlora train --config {Path(cfg.output.dir) / 'config.yaml'} --resume latest", file=sys.stderr)
            return 130
        return 0
    if args.command == "demo":
        from sdlora.commands.demo import DEMO_STEPS, run_demo
        from sdlora.training.signals import TrainingInterrupted

        try:
            run_demo(args.out, steps=args.steps or DEMO_STEPS)
        except TrainingInterrupted as e:
            return _stopped(e)
        return 0
    if args.command == "make-tiny-model":
        from sdlora.model.tiny import make_tiny_model
        from sdlora.model.tiny_sd3 import TINY_SD3_VARIANTS, make_tiny_sd3
        from sdlora.util.ownership import require_own_or_empty_folder

        folder = Path(args.dir).expanduser()
        require_own_or_empty_folder(folder, "make-tiny-model", lambda f: False)  # never over someone's model
        make = make_tiny_sd3 if args.variant in TINY_SD3_VARIANTS else make_tiny_model
        path = make(folder, seed=args.seed, variant=args.variant)
        print(f"tiny {args.variant} model written to {path}")
        return 0
    if args.command == "inspect":
        from sdlora.commands.inspect import run_inspect

        return run_inspect(args)
    if args.command == "export":
        from sdlora.commands.export import run_export

        run_export(args.source, args.format, args.out, dtype=args.dtype, force=args.force, base=args.base, ema=args.ema,
                   vae=args.vae, config_dir=args.config_dir, allow_pickle=args.allow_pickle,
                   text_encoders=args.text_encoders)
        return 0
    if args.command == "merge":
        from sdlora.commands.merge import run_merge

        run_merge(args.adapters, args.out, weights=args.weights, method=args.method, rank=args.rank, layout=args.layout,
                  dtype=args.dtype, force=args.force, base=args.base, fisher_data=args.fisher_data,
                  fisher_samples=args.fisher_samples, config_dir=args.config_dir)
        return 0
    if args.command == "resize":
        from sdlora.commands.resize import run_resize

        rule = next(r for r in ("rank", "sv_ratio", "sv_fro", "sv_cumulative") if getattr(args, r) is not None)
        run_resize(args.adapter, args.out, rule, getattr(args, rule), max_rank=args.max_rank, layout=args.layout,
                   dtype=args.dtype, force=args.force, fisher=args.fisher, fisher_data=args.fisher_data, base=args.base,
                   fisher_samples=args.fisher_samples, config_dir=args.config_dir)
        return 0
    if args.command == "extract":
        from sdlora.commands.extract import run_extract

        run_extract(args.base, args.tuned, args.out, args.rank, conv=args.conv, conv_rank=args.conv_rank,
                    min_diff=args.min_diff, config_dir=args.config_dir, layout=args.layout, dtype=args.dtype,
                    force=args.force)
        return 0
    if args.command == "import-kohya":
        from sdlora.commands.import_kohya import run_import_kohya

        run_import_kohya(args.config, args.out, dataset_config=args.dataset_config, force=args.force, sdxl=args.sdxl)
        return 0
    if args.command == "import-onetrainer":
        from sdlora.commands.import_onetrainer import run_import_onetrainer

        run_import_onetrainer(args.config, args.out, concepts=args.concepts, samples=args.samples, force=args.force)
        return 0
    if args.command == "config-help":
        from sdlora.config import describe_keys

        print(describe_keys())
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
