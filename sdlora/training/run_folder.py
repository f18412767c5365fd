"""The run folder's lifecycle: refusing to overwrite a run, starting it only once every input check has passed,
marking it running / failed / interrupted / finished in run.json, and the stop paths that write the adapter and say
where the last good state is."""

from __future__ import annotations

import contextlib
import errno
import json
import time
from dataclasses import dataclass
from pathlib import Path

from sdlora.errors import NonFiniteWeights, UserError
from sdlora.training.checkpoint import checkpoints_dir
from sdlora.training.nonfinite import NonFiniteCounter, NonFiniteLoss
from sdlora.training.signals import TrainingInterrupted, signal_name
from sdlora.util import atomic


# What a run writes in output.dir (and --overwrite clears): nothing else there is ever touched.
RUN_FILES = ("run.json", "config.yaml", "metrics.jsonl", "probe.jsonl", "adapter.safetensors", "adapter_ema.safetensors")
RUN_FOLDERS = ("checkpoints", "logs", "samples", "adapters")  # adapters: checkpoint.keep_adapters
STATUSES = ("running", "failed", "interrupted", "finished", "stopped_nonfinite")


def run_status(out: Path) -> str | None:
    """The status in out/run.json if sdlora wrote it (a JSON object with one of sdlora's statuses), else None."""
    try:
        state = json.loads((out / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    status = state.get("status") if isinstance(state, dict) else None
    return status if status in STATUSES else None


def check_output_dir(out: Path, *, overwrite: bool, resume: bool = False) -> bool:
    """Refuse to write into a folder that holds a run unless told to; True if the old run is to be cleared.

    Only a folder that holds an sdlora run (its run.json) is ever cleared or resumed; a folder without one may take
    a run only if it holds none of the names a run writes (`RUN_FILES`, `RUN_FOLDERS`): a typo'd or reused
    output.dir keeps its own samples/, logs/, config.yaml. Reads only: nothing is cleared until `RunStart.begin`.
    A run that failed after its start but before saving anything (say, at its first step) holds nothing to lose,
    so the corrected command may reuse its folder without --overwrite.
    """
    status = run_status(out)
    if status is None:
        taken = [n for n in RUN_FILES + RUN_FOLDERS if (out / n).exists() or (out / n).is_symlink()]
        if taken:
            raise UserError(f"output.dir {out} holds {taken[0]} but no sdlora run (no run.json sdlora wrote); sdlora "
                            "replaces only what it wrote for a run: choose another output.dir or move those files away")
        return False
    if resume:
        return False
    if overwrite:
        return True
    if status == "failed" and not saved_anything(out):
        return True
    hint = "--resume to continue it" if status != "failed" else "--resume to continue from its last checkpoint"
    raise UserError(f"output.dir {out} already holds a {status} run; pass --overwrite to replace it (or {hint})")


def saved_anything(out: Path) -> bool:
    ckpts = checkpoints_dir(out)
    return (out / "adapter.safetensors").exists() or (ckpts.is_dir() and any(ckpts.iterdir()))


@dataclass
class RunStart:
    """The moment a launch starts writing its run folder: after every input check (config, model, data, the
    checkpoint to resume) has passed, so bad input stops with the folder byte-identical, an earlier run's
    checkpoints, logs and run.json included. `replace`: check_output_dir's answer (--overwrite)."""

    out: Path
    replace: bool
    main: bool
    started: bool = False

    def begin(self, config_text: str) -> None:
        """Clear the replaced run, mark run.json running, write config.yaml (main process only)."""
        if self.main:
            if self.replace:
                clear_previous_run(self.out)  # a replaced run's checkpoints must never be resumed by mistake
            mark_running(self.out)  # first: from here on the folder is an sdlora run's (check_output_dir)
            self.started = True  # a config.yaml that cannot be written marks the run failed
            atomic.write_text(self.out / "config.yaml", config_text)
        self.started = True

    def failed(self, error: BaseException) -> None:
        """An exception ended the launch: mark the run it started (a launch that never started wrote nothing)."""
        if self.main and self.started:
            mark_failed(self.out, error)


def clear_previous_run(out: Path) -> None:
    """--overwrite without --resume: the old run's checkpoints, logs (metrics, probe, tracker files), training
    samples and exported adapters go, so nothing resumes or extends them, TensorBoard does not draw two runs as one,
    and `samples/` and the adapters are this run's only (an old EMA export would outlive a run without EMA)."""
    import shutil

    assert run_status(out) is not None, out  # check_output_dir: only an sdlora run's folder is ever cleared
    for name in RUN_FOLDERS:
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("metrics.jsonl", "probe.jsonl", "adapter.safetensors", "adapter_ema.safetensors",
                 "adapter_kohya.safetensors"):
        (out / name).unlink(missing_ok=True)


def stop_early(out: Path, step: int, checkpoint: Path, export, main: bool, nonfinite: NonFiniteCounter,
               signum: int | None, say) -> None:
    """After the stop checkpoint: write the adapter, mark the run, and raise what the CLI turns into an exit code."""
    if main:
        write_final_adapter(export, out / "adapter.safetensors", step, checkpoint, None)
    resume_cmd = f"sdlora train --config {out / 'config.yaml'} --resume latest"
    if nonfinite.exhausted:
        if main:
            atomic.write_json(out / "run.json", {"status": "stopped_nonfinite", "steps": step})
        raise NonFiniteLoss(f"training stopped at step {step}: {nonfinite.consecutive} consecutive non-finite steps "
                            f"(loss or gradients; train.max_nonfinite_steps); the last good state is in {checkpoint} and "
                            f"{out / 'adapter.safetensors'} (lower optim.lr, or try mixed_precision bf16 / no)")
    if main:
        atomic.write_json(out / "run.json", {"status": "interrupted", "steps": step})
    raise TrainingInterrupted(f"interrupted by {signal_name(signum)} after step {step}; checkpoint {checkpoint} and "
                              f"adapter {out / 'adapter.safetensors'} saved; resume with: {resume_cmd}", signum)


def stop_nonfinite_weights(out: Path, step: int, main: bool, say) -> None:
    """Step `step`'s update made the LoRA weights non-finite: nothing is saved; the message names the newest
    intact checkpoint (every saved tensor is finite: checkpoints refuse anything else)."""
    from sdlora.training.checkpoint import list_checkpoints, verify_checkpoint

    good = next((p for p in reversed(list_checkpoints(out)) if verify_checkpoint(p) is None), None)
    where = f"the last good state is in {good}" if good else "no checkpoint was saved before it"
    if main:
        atomic.write_json(out / "run.json", {"status": "stopped_nonfinite", "steps": step})
    raise NonFiniteWeights(f"training stopped: the update of step {step} made LoRA weights non-finite "
                           f"(finite loss and gradients; lower optim.lr); nothing was saved from it; {where}")


def write_final_adapter(export, path: Path, step: int, checkpoint: Path | None, cfg, report=None):
    """The run's adapter, written and returned (AdapterWeights, as in the file); a write that fails (full disk,
    read-only folder) is one line naming the intact checkpoint and the command that writes the same adapter from it."""
    try:
        return export(path, step, report)
    except OSError as e:
        reason = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        if checkpoint is None:
            raise UserError(f"the adapter could not be written to {path}: {reason}; no checkpoint holds it") from None
        dtype = f" --dtype {cfg.export.dtype}" if cfg is not None and cfg.export.dtype != "fp32" else ""
        raise UserError(f"the adapter could not be written to {path}: {reason}; the trained state at step {step} is "
                        f"intact in checkpoint {checkpoint}; once there is room, write the adapter with: sdlora export "
                        f"{checkpoint} --format diffusers --out {path}{dtype}") from None


def mark_running(out: Path) -> None:
    atomic.write_json(out / "run.json", {"status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S")})


def mark_failed(out: Path, error: BaseException) -> None:
    """Only a run still marked running: interrupted and non-finite stops have written their own status. A
    KeyboardInterrupt (a second Ctrl-C, which stops at once, possibly mid-save) marks it interrupted."""
    marker = out / "run.json"
    try:
        status = json.loads(marker.read_text()).get("status")
    except (OSError, ValueError):
        return
    if status != "running":
        return
    if isinstance(error, KeyboardInterrupt):
        state = {"status": "interrupted", "stopped": time.strftime("%Y-%m-%dT%H:%M:%S"),
                 "note": "stopped at once by a second signal; --resume latest continues from the newest intact checkpoint"}
    else:
        state = {"status": "failed", "error": f"{type(error).__name__}: {error}"[:2000],
                 "failed": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with contextlib.suppress(OSError):  # a full disk must not hide the error that stopped the run
        atomic.write_json(marker, state)


def finish_run(out: Path, step: int, seconds: float) -> None:
    atomic.write_json(out / "run.json", {"status": "finished", "steps": step, "seconds": round(seconds, 2),
                                         "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
