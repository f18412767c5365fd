"""The `sdlora inspect` command: argument checks, then report (table / JSON / plots) or mitigation."""

from __future__ import annotations

import json
from pathlib import Path

from sdlora.errors import UserError
from sdlora.util.atomic import write_json
from sdlora.util.ownership import INSPECT_MARK, inspect_folder_is_replaceable

PLOT_FILES = ("inspect.json", "dw_norm.png", "intruders.png")  # what --out receives


def run_inspect(args) -> int:
    from sdlora.analysis.inspect import BaseModel, format_report, inspect_adapter, write_plots

    for p in [args.adapter] + ([args.compare] if args.compare else []):
        if not Path(p).is_file():
            raise UserError(f"adapter file not found: {p}")
    base = BaseModel(args.base) if args.base else None
    if args.mitigate_intruders is not None:
        if base is None or not args.out:
            raise UserError("--mitigate-intruders needs --base MODEL and --out NEW.safetensors")
        from sdlora.analysis.mitigate import format_mitigation, mitigate_adapter

        report = mitigate_adapter(args.adapter, base, args.mitigate_intruders, args.out, top_k=args.top_k,
                                  epsilon=args.epsilon, overwrite=args.overwrite)
        print(json.dumps(report, indent=2) if args.json else format_mitigation(report))
        return 0

    if args.out:  # before any work: never a file sdlora did not write
        out = Path(args.out).expanduser()
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file; give a folder for the plots and inspect.json")
        inspect_folder_is_replaceable(out, PLOT_FILES)
    report = inspect_adapter(args.adapter, base, top_k=args.top_k, epsilon=args.epsilon)
    compare = inspect_adapter(args.compare, base, top_k=args.top_k, epsilon=args.epsilon) if args.compare else None
    full = dict(report, compare=compare) if compare else report
    if args.out:
        write_json(out / "inspect.json", {**INSPECT_MARK, **full})  # before the plots: the report survives a missing matplotlib
        written = write_plots([report] + ([compare] if compare else []), out)
    print(json.dumps(full, indent=2) if args.json else format_report(report, compare))
    if args.out and not args.json:
        print(f"\nwrote {out / 'inspect.json'}, " + ", ".join(str(p) for p in written))
    return 0
