"""`sdlora export SOURCE --format F --out PATH`: a trained adapter in every format other tools read.

SOURCE is an adapter .safetensors file, a run folder (output.dir, holding adapter.safetensors) or a
checkpoint folder (output.dir/checkpoints/step_NNNNNN/, holding adapter.safetensors; with --ema, the
adapter_ema.safetensors that train.ema writes beside it). The merged formats need --base MODEL (and, as the
training config did, --vae / --config-dir / --allow-pickle / --text-encoders where the base needs them).

An adapter file may come from anyone, so its run record (`sdlora.adapter.run_record`) is a description only:
it says what the adapter predicts and labels the files, but never picks a path to open (base model, VAE,
config folder, caption files) or turns on an option (`allow_pickle`); those come from the command line.
"""

from __future__ import annotations

from pathlib import Path

from sdlora.adapter.io import LAYOUTS, load_adapter, reader_notes, save_adapter
from sdlora.adapter.run_record import RunRecord
from sdlora.adapter.weights import AdapterWeights
from sdlora.errors import UserError
from sdlora.util.dtypes import DTYPES
from sdlora.util.ownership import require_replaceable

FORMATS = ("diffusers", "kohya", "merged-diffusers", "merged-single-file")


def resolve_adapter_file(source: str | Path, ema: bool = False) -> Path:
    p = Path(source).expanduser()
    name = "adapter_ema.safetensors" if ema else "adapter.safetensors"
    if p.is_file():
        if ema:
            raise UserError(f"export --ema: give a run or checkpoint folder, or the {name} file itself without --ema")
        return p
    if p.is_dir():
        if (p / name).is_file():
            return p / name
        hint = " (its checkpoints/step_NNNNNN/ folders hold one each)" if (p / "checkpoints").is_dir() else ""
        if ema:
            hint = " (it is written when train.ema.enabled is on)"
        raise UserError(f"export: {p} holds no {name}{hint}")
    raise UserError(f"export: no such file or folder: {p}")


def run_export(source, fmt: str, out, *, dtype: str = "fp32", force: bool = False, base: str | None = None,
               report=print, ema: bool = False, vae: str | None = None, config_dir: str | None = None,
               allow_pickle: bool = False, text_encoders: str | None = None) -> Path:
    if fmt not in FORMATS:
        raise UserError(f"export --format {fmt!r}: allowed {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise UserError(f"export --dtype {dtype!r}: allowed {', '.join(DTYPES)}")
    out = Path(out).expanduser()
    require_replaceable(out, "export")  # --force or not: never a file or folder sdlora did not write
    if out.exists() and not force:
        raise UserError(f"export: {out} exists; pass --force to replace it")
    adapter = load_adapter(resolve_adapter_file(source, ema))
    record = RunRecord.from_metadata(adapter.metadata)  # None for another trainer's file
    if record is not None and record.base_model_version:
        from sdlora.model.families import family_of_version

        family = family_of_version(record.base_model_version)[0]
        if fmt in family.formats_missing:
            raise UserError(f"export --format {fmt}: not written for {family.title} adapters yet (allowed: "
                            f"{', '.join(f for f in FORMATS if f not in family.formats_missing)}; ComfyUI reads the "
                            "diffusers layout)")
    torch_dtype = DTYPES[dtype]
    if fmt in LAYOUTS:  # every write is atomic; a failed one is a WriteError naming `out` (one line, exit 2)
        tags = record.tag_frequency if fmt == "kohya" and record is not None else None  # counted at training
        save_adapter(adapter.to(torch_dtype), out, fmt, tag_frequencies=tags)
        for note in reader_notes(adapter, fmt):
            report(f"export: warning: {note}")
    else:
        if not base:
            said = f" (its run record says it was trained on {record.base_model})" if record and record.base_model else ""
            raise UserError(f"export --format {fmt}: pass --base MODEL, the base model to merge into{said}")
        _export_merged(adapter, record, fmt, out, torch_dtype, str(Path(base).expanduser()),
                       vae=vae, config_dir=config_dir, allow_pickle=allow_pickle, text_encoders=text_encoders)
    report(f"export: {fmt} written to {out}")
    return out


def _export_merged(adapter: AdapterWeights, record: RunRecord | None, fmt: str, out: Path, dtype, base: str, *,
                   vae: str | None, config_dir: str | None, allow_pickle: bool, text_encoders: str | None) -> None:
    from sdlora.adapter.algebra import merge_adapter
    from sdlora.adapter.merge import pipeline_scheduler, save_merged_diffusers, single_file_carry
    from sdlora.model.loading import load_components
    from sdlora.model.schedule import inference_schedule
    from sdlora.model.single_file import save_single_file

    # The merged model predicts what the adapter was trained to predict, on the schedule it was trained on (the
    # record describes both), whatever the base's configs say; every path and option is the command line's.
    comps = load_components(base, vae_path=vae, config_dir=config_dir, allow_pickle=allow_pickle,
                            prediction_type=record.prediction_type if record else None,
                            zero_terminal_snr=record.zero_terminal_snr if record else None,
                            text_encoders_path=text_encoders)
    merge_adapter(adapter, comps.adaptable())
    if fmt == "merged-diffusers":
        scheduler = pipeline_scheduler(base, comps.family.bundled_configs().name, config_dir)
        scheduler = inference_schedule(scheduler, comps.prediction_type, comps.zero_terminal_snr)
        save_merged_diffusers(out, comps, scheduler, dtype, record)
    else:
        save_single_file(out, comps, dtype=dtype, carry=single_file_carry(base, allow_pickle), record=record)
