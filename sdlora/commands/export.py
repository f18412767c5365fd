"""`sdlora export SOURCE --format F --out PATH`: a trained adapter in every format other tools read.

SOURCE is an adapter .safetensors file, a run folder (output.dir, holding adapter.safetensors) or a
checkpoint folder (output.dir/checkpoints/step_NNNNNN/, holding adapter.safetensors; with --ema, the
adapter_ema.safetensors that train.ema writes beside it). The base model
(needed by the merged formats) is the run's `model.path`, from the adapter's run record
(`sdlora.adapter.run_record`), unless --base names another.
"""

from __future__ import annotations

from pathlib import Path

from sdlora.adapter.io import LAYOUTS, load_adapter, reader_notes, save_adapter
from sdlora.adapter.run_record import RunRecord
from sdlora.adapter.weights import AdapterWeights
from sdlora.errors import UserError
from sdlora.training.export import DTYPES

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


def _tag_frequencies(cfg: dict) -> dict[str, dict[str, int]]:
    """kohya's ss_tag_frequency from the run's caption files, where they are still on disk."""
    from sdlora.adapter.kohya import tag_frequency

    data = cfg.get("data") or {}
    ext = data.get("caption_extension", ".txt")
    sources = [(data.get("path"), ext)] + [(s.get("path"), s.get("caption_extension", ext)) for s in data.get("subsets") or []]
    captions = {}
    for folder, ext in sources:  # each subset has its own caption extension
        if not folder:
            continue
        f = Path(folder)
        if f.is_dir():
            captions[f.name] = [c.read_text(encoding="utf-8", errors="replace").strip() for c in sorted(f.rglob(f"*{ext}"))]
    return tag_frequency(captions)


def run_export(source, fmt: str, out, *, dtype: str = "fp32", force: bool = False, base: str | None = None,
               report=print, ema: bool = False) -> Path:
    if fmt not in FORMATS:
        raise UserError(f"export --format {fmt!r}: allowed {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise UserError(f"export --dtype {dtype!r}: allowed {', '.join(DTYPES)}")
    out = Path(out).expanduser()
    if out.exists() and not force:
        raise UserError(f"export: {out} exists; pass --force to replace it")
    adapter = load_adapter(resolve_adapter_file(source, ema))
    record = RunRecord.from_metadata(adapter.metadata)  # None for another trainer's file
    cfg = record.config if record is not None else {}
    torch_dtype = DTYPES[dtype]
    if fmt in LAYOUTS:  # every write is atomic; a failed one is a WriteError naming `out` (one line, exit 2)
        save_adapter(adapter.to(torch_dtype), out, fmt, tag_frequencies=_tag_frequencies(cfg) if fmt == "kohya" else None)
        for note in reader_notes(adapter, fmt):
            report(f"export: warning: {note}")
    else:
        _export_merged(adapter, record, fmt, out, torch_dtype, base or (record.base_model if record else None),
                       cfg.get("model") or {})
    report(f"export: {fmt} written to {out}")
    return out


def _export_merged(adapter: AdapterWeights, record: RunRecord | None, fmt: str, out: Path, dtype, base: str | None,
                   model_cfg: dict) -> None:
    from sdlora.adapter.algebra import merge_adapter
    from sdlora.adapter.merge import pipeline_scheduler, save_merged_diffusers, single_file_carry
    from sdlora.model.loading import load_components
    from sdlora.model.schedule import inference_schedule
    from sdlora.model.single_file import save_single_file

    if not base:
        raise UserError("export: the adapter does not say which base model it was trained on; pass --base MODEL")
    config_dir, allow_pickle = model_cfg.get("config_dir"), bool(model_cfg.get("allow_pickle", False))
    # The merged model predicts what the adapter was trained to predict, on the schedule it was trained on (the
    # record), whatever the base's configs say.
    comps = load_components(base, vae_path=model_cfg.get("vae_path"), config_dir=config_dir, allow_pickle=allow_pickle,
                            prediction_type=record.prediction_type if record else model_cfg.get("prediction_type"),
                            zero_terminal_snr=record.zero_terminal_snr if record else model_cfg.get("zero_terminal_snr"))
    merge_adapter(adapter, comps.adaptable())
    if fmt == "merged-diffusers":
        scheduler = pipeline_scheduler(base, comps.family.base_model_version("epsilon"), config_dir)
        scheduler = inference_schedule(scheduler, comps.prediction_type, comps.zero_terminal_snr)
        save_merged_diffusers(out, comps, scheduler, dtype, record)
    else:
        save_single_file(out, comps, dtype=dtype, carry=single_file_carry(base, allow_pickle), record=record)
