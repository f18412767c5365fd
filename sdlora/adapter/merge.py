"""Merging an adapter into the base weights, and writing the merged model (diffusers folder or single file)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch

from sdlora.errors import UserError, WriteError
from sdlora.util.ownership import MERGED_MARKER
from sdlora.util import atomic


def pipeline_scheduler(model_path: str, version: str, config_dir: str | None):
    """The inference scheduler the base model ships with (its own folder's, else the configs'); `version` names the
    bundled configs' folder (`family.bundled_configs().name`: for epsilon prediction; the caller sets the prediction
    type)."""
    import diffusers

    from sdlora.model.single_file import BUNDLED_CONFIGS

    candidates = [Path(model_path) / "scheduler"] if Path(model_path).is_dir() else []
    if config_dir:
        candidates.append(Path(config_dir) / "scheduler")
    candidates.append(BUNDLED_CONFIGS / version / "scheduler")
    for folder in candidates:
        f = folder / "scheduler_config.json"
        if f.is_file():
            config = json.loads(f.read_text(encoding="utf-8"))
            name = config.get("_class_name", "DDIMScheduler")
            cls = getattr(diffusers, name, None) if isinstance(name, str) else None
            # The file names a class: only one of diffusers' schedulers may be it (a model folder may come from anyone).
            if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
                raise UserError(f"{f}: _class_name {name!r} is not a diffusers scheduler")
            return cls.from_config(config)
    raise AssertionError("bundled scheduler config missing")


def save_merged_diffusers(out: Path, comps, scheduler, dtype: torch.dtype, record=None) -> None:
    """A complete diffusers folder of the family's pipeline (StableDiffusionPipeline, StableDiffusionXLPipeline),
    built in a temp folder beside `out` and renamed into place; the run's `RunRecord` goes in as sdlora_run.json
    (diffusers ignores it)."""
    from sdlora.util.finite import require_finite

    encoders = {name: te.to(dtype) for name, te in comps.text_encoders.items()}
    pipe = comps.family.pipeline(denoiser=comps.denoiser.to(dtype), vae=comps.vae.to(dtype), text_encoders=encoders,
                                 tokenizers=comps.tokenizers, scheduler=scheduler)
    for part in comps.family.parts:  # save_pretrained does not go through atomic.save_safetensors
        if getattr(pipe, part.name) is not None:  # an optional part the model lacks (SD3 without T5)
            require_finite(getattr(pipe, part.name).state_dict(), out / part.name)
    with build_folder_atomically(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        atomic.write_json(tmp / MERGED_MARKER, {"written_by": "sdlora export", "format": "merged-diffusers"})
        if record is not None:
            record.write_folder(tmp)


@contextlib.contextmanager
def build_folder_atomically(out: Path):
    """Yield a temp folder beside `out`; on success it replaces `out` (an old `out` is removed only then)."""
    out = Path(out)
    try:
        tmp = atomic.make_temp_dir(out)  # 0777 less the umask, as the folder save_pretrained would make
    except OSError as e:
        raise WriteError(out, e) from e
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, WriteError):  # e.g. a full disk in diffusers' save_pretrained
            raise WriteError(out, e) from e
        raise


def single_file_carry(model_path: str, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """Tensors of a single-file base that the mapping does not produce (SD 2.x's unused last text layer,
    text_projection, schedule buffers; SDXL bigG's logit_scale), carried into a merged single file; none for a
    folder base. The `v_pred` / `ztsnr` markers are not carried: the merged model's own noise schedule writes them."""
    from sdlora.model.single_file import read_checkpoint

    from sdlora.model import ldm_keys as L

    p = Path(model_path)
    if p.is_dir():
        return {}
    # Mapped models are written from the merged weights; an unmerged EMA copy or an old-layout CLIP-L would mislead;
    # SD3's text encoders (text_encoders.*) are written from the loaded ones.
    skip = (L.UNET, L.VAE, "cond_stage_model.transformer.", L.SDXL_CLIP_L, "model_ema.", "text_encoders.")
    kept = lambda k: not k.startswith(skip) and k not in (L.V_PRED_KEY, L.ZTSNR_KEY)  # noqa: E731
    if p.suffix.lower() == ".safetensors":  # only the carried tensors (an SD3.5 Large file is 16 GB)
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if kept(k)}
    sd, _ = read_checkpoint(p, allow_pickle=allow_pickle)
    return {k: v for k, v in sd.items() if kept(k)}
