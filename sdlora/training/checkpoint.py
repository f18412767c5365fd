"""Resumable checkpoints: everything the loop needs to continue a run exactly, saved so a kill cannot tear it.

A checkpoint is a folder `<output.dir>/checkpoints/step_NNNNNN/` holding

    adapter.safetensors     the adapter export at this step (as the final one: loads in diffusers where it reads the kind)
    lora_state.safetensors  every adapter tensor (A, B, alpha, offset factors) as trained, fp32
    optimizer.pt            the optimiser state (moments, step counts, per-group rates)
    trainer_state.json      step, LR-scheduler state, data-order position, non-finite counters
    ema.safetensors         with train.ema: the averaged adapter tensors (fp32), and adapter_ema.safetensors
    merged.safetensors      with lora.merge_every, once merged: the pieces added into the base weights (fp32)
    rng_rank{i}.pt          per process: torch / CUDA / Python / NumPy RNGs and the trainer's noise generator
                            (tensors and plain values: every .pt here loads with torch.load(weights_only=True),
                            so a checkpoint folder from someone else cannot run code on resume)
    manifest.json           name, size and SHA-256 of every file above, written LAST

How a save stays safe: every file is written atomically (`atomic.py`) into a staging folder
`checkpoints/.staging-step_NNNNNN/`; the manifest is written after all of them; then the staging folder is
renamed to its final name (one `rename`), and only then are older checkpoints pruned. A kill at any point
leaves either no new checkpoint folder, or a complete one; a folder without a valid manifest is never used.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdlora.errors import UserError
from sdlora.util import atomic
from sdlora.util.atomic import file_sha256

ADAPTERS_DIR = "adapters"
CHECKPOINTS_DIR = "checkpoints"
MANIFEST = "manifest.json"
STAGING_PREFIX = ".staging-"
FORMAT_VERSION = 1


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def checkpoints_dir(out: str | os.PathLike) -> Path:
    return Path(out) / CHECKPOINTS_DIR


def adapters_dir(out: str | os.PathLike) -> Path:
    """Where checkpoint.keep_adapters keeps each checkpoint's adapter (never pruned)."""
    return Path(out) / ADAPTERS_DIR


def _step_of(folder: Path) -> int | None:
    name = folder.name
    if not name.startswith("step_") or not name[5:].isdigit():
        return None
    return int(name[5:])


def list_checkpoints(out: str | os.PathLike) -> list[Path]:
    """Checkpoint folders (complete or not) by step, oldest first; staging folders are not listed."""
    root = checkpoints_dir(out)
    if not root.is_dir():
        return []
    found = [(s, p) for p in root.iterdir() if p.is_dir() and (s := _step_of(p)) is not None]
    return [p for _, p in sorted(found)]


# ------------------------------------------------------------------------------------------- manifest
def write_manifest(folder: Path, step: int) -> dict:
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST and not p.name.startswith("."))
    manifest = {"format": FORMAT_VERSION, "step": step,
                "files": {n: {"bytes": (folder / n).stat().st_size, "sha256": file_sha256(folder / n)} for n in files}}
    atomic.write_json(folder / MANIFEST, manifest)
    return manifest


def verify_checkpoint(folder: str | os.PathLike) -> str | None:
    """None when the checkpoint is complete and intact, else the reason it is not (one line)."""
    folder = Path(folder)
    mpath = folder / MANIFEST
    if mpath.is_symlink():
        return "corrupt: manifest.json is a symbolic link, not a file sdlora wrote"
    if not mpath.is_file():
        return "incomplete: no manifest.json (the save did not finish)"
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        return "corrupt: manifest.json does not parse"
    if not isinstance(files, dict):
        return "corrupt: manifest.json does not parse"
    for name in ("trainer_state.json", "lora_state.safetensors", "optimizer.pt"):
        if name not in files:
            return f"corrupt: manifest.json does not list {name}"
    for name, meta in files.items():
        # A manifest is data: it names files of this folder only, never a path elsewhere (nor a link to one).
        if not _plain_name(name):
            return f"corrupt: manifest.json lists {name!r}, not a file name of the checkpoint folder"
        p = folder / name
        if p.is_symlink():
            return f"corrupt: {name} is a symbolic link, not a file sdlora wrote"
        if not isinstance(meta, dict) or not isinstance(meta.get("bytes"), int) or not isinstance(meta.get("sha256"), str):
            return f"corrupt: manifest.json's entry for {name} does not parse"
        if not p.is_file():
            return f"corrupt: {name} is missing"
        if p.stat().st_size != meta["bytes"]:
            return f"corrupt: {name} has {p.stat().st_size} bytes, the manifest says {meta['bytes']}"
        if file_sha256(p) != meta["sha256"]:
            return f"corrupt: {name} does not match its SHA-256 in the manifest"
    return None


def _plain_name(name) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name \
        and os.sep not in name and Path(name).name == name


def _listed(folder: Path) -> set[str]:
    return set(json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"])


def load_torch_file(path: Path, folder: Path):
    """A torch file of a checkpoint, loaded with `weights_only=True`: tensors and plain values only, so nothing in
    it can run code (a checkpoint folder may come from someone else). Anything else is a one-line UserError."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"--resume: checkpoint {folder}: {path.name} holds objects other than tensors and plain values; "
                        "refused, as loading them could run code (sdlora never writes such a file)") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise UserError(f"--resume: checkpoint {folder}: {path.name} does not load ({type(e).__name__})") from None


def _finite(state, folder: Path, name: str, where: str = ""):
    """`state` (nested dicts, lists, tensors) itself; a UserError naming the first tensor holding NaN or inf (a
    shared or damaged checkpoint would otherwise train one step from it and then refuse every write)."""
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    for key, value in items:
        inner = f"{where}.{key}" if where else str(key)
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise UserError(f"--resume: checkpoint {folder}: {name} {inner} holds non-finite values (NaN/inf); "
                                "resume from an earlier checkpoint")
        else:
            _finite(value, folder, name, inner)
    return state


def find_checkpoint(out: str | os.PathLike, spec: str, report=print) -> Path:
    """`latest` -> the newest intact checkpoint under out/checkpoints (broken newer ones are reported and
    skipped); a path -> that checkpoint folder, which must be intact."""
    if spec != "latest":
        folder = Path(os.path.expanduser(spec))
        if not folder.is_dir():
            raise UserError(f"--resume: no such checkpoint folder: {folder} (give a checkpoints/step_NNNNNN folder or 'latest')")
        problem = verify_checkpoint(folder)
        if problem:
            raise UserError(f"--resume: checkpoint {folder} is {problem}; use --resume latest to pick the newest intact one")
        return folder
    candidates = list_checkpoints(out)
    for folder in reversed(candidates):
        problem = verify_checkpoint(folder)
        if problem is None:
            return folder
        report(f"sdlora: skipping checkpoint {folder}: {problem}")
    raise UserError(f"--resume latest: no intact checkpoint in {checkpoints_dir(out)}"
                    + (f" ({len(candidates)} broken ones skipped)" if candidates else ""))


# ------------------------------------------------------------------------------------ adapter tensors
def lora_state(layers: dict) -> dict[str, torch.Tensor]:
    """Every adapter tensor except the (frozen, possibly offset) base weights, which init rebuilds exactly."""
    state = {}
    for name, layer in layers.items():
        for key, t in layer.state_dict(keep_vars=False).items():
            if not key.startswith("base."):
                state[f"{name}.{key}"] = t.detach().cpu().contiguous()
    return state


def load_lora_state(layers: dict, tensors: dict[str, torch.Tensor], where: Path) -> None:
    expected = lora_state(layers)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        what = f"lacks {missing[0]}" if missing else f"has the unexpected tensor {unexpected[0]}"
        raise UserError(f"--resume: checkpoint {where} does not fit this config's adapters: it {what} "
                        "(lora targets, rank or init changed since it was saved?)")
    for key, t in tensors.items():
        if t.shape != expected[key].shape:
            raise UserError(f"--resume: checkpoint {where}: {key} has shape {tuple(t.shape)}, this config makes "
                            f"{tuple(expected[key].shape)} (lora.rank changed?)")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):  # a shared or damaged checkpoint
            raise UserError(f"--resume: checkpoint {where}: {key} holds non-finite values (NaN/inf); resume from "
                            "an earlier checkpoint")
    with torch.no_grad():
        for name, layer in layers.items():
            for key, target in layer.state_dict(keep_vars=True).items():
                if not key.startswith("base."):
                    target.copy_(tensors[f"{name}.{key}"].to(target.device, target.dtype))


# ------------------------------------------------------------------------------------------------ RNG
def rng_state(noise_gen: torch.Generator | None) -> dict:
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if noise_gen is not None:
        state["noise_gen"] = noise_gen.get_state()
    return state


def restore_rng_state(state: dict, noise_gen: torch.Generator | None) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if noise_gen is not None and "noise_gen" in state:
        noise_gen.set_state(state["noise_gen"])


def _as_tuple(x):
    return tuple(_as_tuple(i) for i in x) if isinstance(x, (list, tuple)) else x


# ------------------------------------------------------------------------------------------ save/load
@dataclass
class Checkpointer:
    """Saves and restores everything stateful in a run. `data` is anything with state_dict/load_state_dict
    (the data order); `export(path, step, tensors=None)` writes the adapter file (training/export.Exporter)."""

    out: Path
    accelerator: object
    layers: dict
    optimizer: object
    lr_scheduler: object
    noise_gen: torch.Generator | None
    export: object
    keep_last: int = 3
    keep_adapters: bool = False  # checkpoint.keep_adapters: each checkpoint's adapter also kept under out/adapters
    data: object = None
    ema: object = None  # training/ema.AdapterEMA when train.ema is on
    merges: object = None  # training/periodic_merge.PeriodicMerge when lora.merge_every is on
    saved: list[Path] = field(default_factory=list)

    def save(self, step: int, counters: dict | None = None) -> Path:
        """Write checkpoint `step` (all processes take part; rank 0 writes the shared files)."""
        acc = self.accelerator
        root = checkpoints_dir(self.out)
        self.require_finite(step)  # before anything is staged: a non-finite state is never saved
        staging = root / f"{STAGING_PREFIX}{checkpoint_name(step)}"
        final = root / checkpoint_name(step)
        try:
            if acc.is_main_process:
                shutil.rmtree(staging, ignore_errors=True)  # a save killed earlier at this step
                staging.mkdir(parents=True)
            acc.wait_for_everyone()
            atomic.save_torch(staging / f"rng_rank{acc.process_index}.pt", rng_state(self.noise_gen))
            if acc.is_main_process:
                self._write_shared(staging, step, counters or {})
            acc.wait_for_everyone()
            if acc.is_main_process:
                write_manifest(staging, step)
                _replace_dir(staging, final)
        except OSError as e:
            shutil.rmtree(staging, ignore_errors=True)
            previous = self.latest_intact()
            kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
            reason = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise UserError(f"checkpoint at step {step} could not be written to {root}: {reason}; {kept}") from None
        if acc.is_main_process:
            if self.keep_adapters:
                self.keep_adapter(final, step)
            self.prune()
        acc.wait_for_everyone()
        return final

    def keep_adapter(self, folder: Path, step: int) -> None:
        """checkpoint.keep_adapters: checkpoint `folder`'s adapter kept as <out>/adapters/step_NNNNNN.safetensors (the
        same bytes), with its kohya-layout twin step_NNNNNN_kohya.safetensors (training/export.export_for_uis) and,
        with train.ema, step_NNNNNN_ema.safetensors. Written atomically; prune() never touches them (--overwrite clears them with the run). A write that
        fails (a full disk) is a one-line error naming the file: the checkpoint itself is already complete."""
        from sdlora.training.export import export_for_uis

        kept = adapters_dir(self.out) / f"{checkpoint_name(step)}.safetensors"
        try:
            kept.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_bytes(kept, (folder / "adapter.safetensors").read_bytes())
            if (folder / "adapter_ema.safetensors").is_file():
                atomic.write_bytes(kept.with_name(f"{kept.stem}_ema.safetensors"),
                                   (folder / "adapter_ema.safetensors").read_bytes())
        except OSError as e:
            raise UserError(f"checkpoint.keep_adapters: {kept} could not be written ({e.strerror or e}); the "
                            f"checkpoint {folder} is complete and holds the same adapter") from None
        export_for_uis(kept, kept.with_name(f"{kept.stem}_kohya.safetensors"))  # a kind the UIs misread: none

    def _write_shared(self, folder: Path, step: int, counters: dict) -> None:
        atomic.save_safetensors(folder / "lora_state.safetensors", lora_state(self.layers))
        atomic.save_torch(folder / "optimizer.pt", self.optimizer.state_dict())
        state = {"step": step, "lr_scheduler": _jsonable(self.lr_scheduler.state_dict()), "counters": counters,
                 "data": self.data.state_dict() if self.data is not None else None,
                 "group_names": [g.get("name") for g in self.optimizer.param_groups],
                 "num_processes": self.accelerator.num_processes}
        atomic.write_json(folder / "trainer_state.json", state)
        self.export(folder / "adapter.safetensors", step)
        if self.merges is not None and (pieces := self.merges.state_dict()):
            atomic.save_safetensors(folder / "merged.safetensors", pieces)
        if self.ema is not None:
            atomic.save_safetensors(folder / "ema.safetensors", self.ema.state_dict())
            self.export(folder / "adapter_ema.safetensors", step, tensors=self.ema.average())

    def require_finite(self, step: int) -> None:
        from sdlora.util.finite import require_finite

        where = checkpoints_dir(self.out) / checkpoint_name(step)
        require_finite(lora_state(self.layers), where)
        moments = {f"optimizer.{i}.{k}": v for i, st in self.optimizer.state_dict()["state"].items()
                   for k, v in st.items()}
        require_finite(moments, where)

    def latest_intact(self) -> Path | None:
        return next((p for p in reversed(list_checkpoints(self.out)) if verify_checkpoint(p) is None), None)

    def prune(self) -> None:
        """Keep the newest `keep_last` intact checkpoints; remove older ones, broken ones and stale staging."""
        folders = list_checkpoints(self.out)
        intact = [p for p in folders if (p / MANIFEST).is_file()]
        keep = set(intact[-self.keep_last:])
        newest_kept = _step_of(intact[-1]) if intact else None
        for p in folders:
            if p not in keep and (p in intact or (newest_kept is not None and _step_of(p) < newest_kept)):
                shutil.rmtree(p, ignore_errors=True)
        for p in checkpoints_dir(self.out).glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(p, ignore_errors=True)

    def restore(self, folder: Path) -> dict:
        """Load `folder` into the live objects; returns trainer_state.json (step, counters, ...)."""
        from safetensors.torch import load_file

        state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
        names = [g.get("name") for g in self.optimizer.param_groups]
        if state.get("group_names") not in (None, names):
            raise UserError(f"--resume: checkpoint {folder} was saved with other optimiser groups "
                            f"({len(state['group_names'])} vs {len(names)}; optim.lr_rules or the targets changed?)")
        if state.get("num_processes", 1) != self.accelerator.num_processes:
            raise UserError(f"--resume: checkpoint {folder} was saved by {state['num_processes']} processes, this run has "
                            f"{self.accelerator.num_processes}; resume with the same number")
        listed = _listed(folder)  # only files the (verified) manifest names and hashes are opened
        load_lora_state(self.layers, load_file(str(folder / "lora_state.safetensors")), folder)
        self.optimizer.load_state_dict(_finite(load_torch_file(folder / "optimizer.pt", folder), folder, "optimizer.pt"))
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.merges is not None and "merged.safetensors" in listed:  # the pieces added into the base weights again
            self.merges.load_state_dict(load_file(str(folder / "merged.safetensors")), folder)
        if self.data is not None and state.get("data") is not None:
            self.data.load_state_dict(state["data"])
        if self.ema is not None:
            if "ema.safetensors" in listed:
                self.ema.load_state_dict(_finite(load_file(str(folder / "ema.safetensors")), folder, "ema.safetensors"))
            else:  # a checkpoint saved before train.ema was turned on: the average starts here
                self.ema.reset()
        rng_file = f"rng_rank{self.accelerator.process_index}.pt"
        if rng_file not in listed:
            raise UserError(f"--resume: checkpoint {folder} holds no {rng_file} in its manifest (saved by another number "
                            "of processes?)")
        rng = load_torch_file(folder / rng_file, folder)
        try:
            restore_rng_state(rng, self.noise_gen)
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            raise UserError(f"--resume: checkpoint {folder}: {rng_file} is not an RNG state sdlora wrote "
                            f"({type(e).__name__}: {e})"[:400]) from None
        return state


def _replace_dir(staging: Path, final: Path) -> None:
    """Rename the finished staging folder into place; an existing folder of the same step is moved aside first."""
    if final.exists():
        aside = final.with_name(f"{STAGING_PREFIX}old-{final.name}")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
        os.replace(staging, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(staging, final)
    atomic._fsync_dir(final.parent)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return None  # LambdaLR keeps its lambdas here as None already; nothing else is expected
