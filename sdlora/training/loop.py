"""The training loop. Set-up (training/setup.py), then each optimiser step: an explicit loop over its micro-batches
(training/step.py's forward, backward), the update, then the after-step work (log, validation, probe, checkpoint,
samples, stop); then the export. Helpers carry the detail, `_train` carries the story."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdlora.config import Config, dump_yaml
from sdlora.lora import trainable_count
from sdlora.lora.layers import AdapterLayer
from sdlora.model.components import Components
from sdlora.training import preflight
from sdlora.training.checkpoint import find_checkpoint
from sdlora.training.export import UI_FILE, export_for_uis
from sdlora.training.fisher import store_run_fisher
from sdlora.training.offload import encoders_on
from sdlora.training.nonfinite import agree, all_finite, grads_finite
from sdlora.training.optim import use_average_weights, use_training_weights
from sdlora.training.run_folder import (
    RunStart,
    check_output_dir,
    finish_run,
    stop_early,
    stop_nonfinite_weights,
    write_final_adapter,
)
from sdlora.training.sampling import sample_due, sample_during_training
from sdlora.training.setup import Run, build_model, prepare_run, resume_from
from sdlora.training.signals import GracefulStop
from sdlora.training.step import MicroBatch, micro_batch_loss
from sdlora.training.validation import validation_due
from sdlora.util.allocator import keep_freed_cpu_memory
from sdlora.util.jsonl_log import JsonlLog


@dataclass
class TrainResult:
    out_dir: Path
    adapter_path: Path | None
    components: Components
    layers: dict[str, AdapterLayer]
    losses: list[float] = field(default_factory=list)
    step: int = 0


def train(cfg: Config, *, overwrite: bool = False, resume: str | None = None, dry_run: bool = False, log=print,
          fault_hook=None) -> TrainResult:
    """Train; `resume` is 'latest' or a checkpoint folder. `fault_hook(step, loss) -> loss` exists for the
    reliability tests (they poison chosen steps' losses with NaN); leave it None."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    out = Path(cfg.output.dir)
    preflight.before_model(cfg)  # paths and optional packages: before anything is written or loaded
    # train() may run several times in one process (demo, tests, benchmarks): let each call choose its precision.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        log_with=None if cfg.log.tracker == "none" or dry_run else cfg.log.tracker,
        project_dir=str(out / "logs"),
    )
    main = accelerator.is_main_process
    say = log if main else (lambda *a, **k: None)
    if accelerator.device.type == "cpu":
        keep_freed_cpu_memory()  # a quarter of a CPU step was the kernel zero-filling freed activations again
    # every process reads run.json before anyone writes; the folder itself is written only once the inputs checked out
    replace = not dry_run and check_output_dir(out, overwrite=overwrite, resume=resume is not None)
    accelerator.wait_for_everyone()
    run = RunStart(out, replace, main)
    stop = GracefulStop()  # installed by the loop (SIGINT/SIGTERM: finish the step, checkpoint, exit)
    try:
        return _train(cfg, accelerator, out, main, say, run, resume=resume, dry_run=dry_run, fault_hook=fault_hook,
                      stop=stop)
    except BaseException as e:  # errors, and KeyboardInterrupt: a second Ctrl-C stops at once, even mid-save
        run.failed(e)  # a run that stops on an error is not left marked "running"
        for tracker in accelerator.trackers:  # their files closed, as end_training() does after a finished run
            tracker.finish()
        raise
    finally:
        stop.uninstall()  # whatever ended the run: a handler left behind would swallow this process's next Ctrl-C


def _train(cfg: Config, accelerator, out: Path, main: bool, say, run_start: RunStart, *, resume, dry_run, fault_hook,
           stop: GracefulStop) -> TrainResult:
    from accelerate.utils import set_seed

    # ---- set-up: model and adapters, data, optimiser, the step's parts, checkpoints (training/setup.py)
    set_seed(cfg.train.seed)
    comps, layers, groups = build_model(cfg, say)
    if dry_run:
        from sdlora.util.tables import plan_table

        say(plan_table(layers, groups, cfg, comps.family))
        return TrainResult(out, None, comps, layers)
    say(f"sdlora: {len(layers)} adapted modules, {trainable_count(layers):,} trainable parameters")
    run = prepare_run(cfg, accelerator, out, main, say, comps, layers, groups)
    step = first_step = 0 if resume is None else resume_from(run, find_checkpoint(out, resume, say))

    # ---- start: every input check has passed; only now is the run folder written (an old run replaced)
    run_start.begin(dump_yaml(cfg))
    if main and accelerator.log_with:  # the trackers asked for and installed (accelerator.trackers is empty until init)
        accelerator.init_trackers("sdlora", config=tracker_hparams(cfg), init_kwargs=tracker_init_kwargs(cfg, out))
    accelerator.wait_for_everyone()
    logs = RunLogs(out, step if resume else None, progress_bar(cfg.train.max_steps, disable=not main, initial=step))
    batches = run.data.batches()
    weights_finite = torch.ones((), dtype=torch.bool, device=accelerator.device)  # after the latest update
    stop.install()  # train() uninstalls it however the run ends
    t0 = time.perf_counter()
    while step < cfg.train.max_steps:
        # ---- one optimiser step: its micro-batches' forward and backward, then the update
        sums, finite = {}, torch.ones((), dtype=torch.bool, device=accelerator.device)
        use_training_weights(run.optimizer)  # schedule-free AdamW: its gradient point; others: nothing
        for _ in range(cfg.train.gradient_accumulation_steps):
            with accelerator.accumulate(*run.trained):  # gradients synchronised on the last micro-batch only
                parts = micro_batch_loss(run, next(batches), step + 1)
                loss = parts.loss if fault_hook is None else fault_hook(step + 1, parts.loss)
                accelerator.backward(loss)
            for name, value in step_scalars(loss, parts, run.regulariser).items():
                sums[name] = sums[name] + value if name in sums else value
            finite = finite & torch.isfinite(loss.detach())  # on the device: no host sync here
        verdict, weights_finite = optimiser_step(run, step, finite, weights_finite, stop)
        use_average_weights(run.optimizer)  # what validation, samples, checkpoints and the export see
        applied_lrs = {g["name"]: g["lr"] for g in run.optimizer.param_groups}  # this step's rates, logged below
        run.lr_scheduler.step()  # a skipped step still counts: LR curve, data order and step numbers stay aligned
        step += 1

        # ---- after the step: merge (lora.merge_every), log, validation, probe, checkpoint, samples, stop
        if run.merges is not None and run.merges.due(step) and bool(weights_finite):  # a host sync every N steps
            run.merges(step)
        if run.ema is not None:
            run.ema.update(step)
        run.nonfinite.record(verdict.finite)
        if not verdict.finite:
            say(f"sdlora: step {step}: {verdict.reason}, step skipped ({run.nonfinite.consecutive} in a row, "
                f"{run.nonfinite.total} in all)")
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            log_step(run, logs, step, sums, cfg.train.gradient_accumulation_steps, applied_lrs)
        after_step(run, logs, step, verdict, weights_finite, stop)
    stop.uninstall()
    logs.close(main)
    accelerator.wait_for_everyone()

    # ---- export
    adapter_path = out / "adapter.safetensors"
    if main:
        adapter = write_final_adapter(run.export, adapter_path, step, run.checkpointer.latest_intact(), cfg, report=say)
        if cfg.export.fisher_samples:  # on the models in memory (offloaded text encoders on the device for it)
            with encoders_on(comps.text_encoders, accelerator.device):
                store_run_fisher(cfg, adapter, adapter_path, comps, layers, run.data, run.objective, accelerator.autocast, say)
        if run.ema is not None:  # the average written in the live tensors' place
            run.export(out / "adapter_ema.safetensors", step, tensors=run.ema.average())
        for_uis = export_for_uis(adapter_path, out / UI_FILE)
        finish_run(out, step, time.perf_counter() - t0)
        ran = f"steps {first_step + 1}-{step} ({step - first_step})" if first_step else f"{step} steps"  # this launch's
        say(f"sdlora: trained {ran} in {time.perf_counter() - t0:.1f}s; adapter: {adapter_path}; {for_uis}")
    accelerator.end_training()
    return TrainResult(out, adapter_path, comps, layers, run.losses, step)


def optimiser_step(run: Run, step: int, finite, weights_finite, stop: GracefulStop):
    """The update of step `step + 1` once its gradients are accumulated: clipping, the one host sync of the step
    (every process agrees the loss, gradients and weights are finite, and on a stop signal), then the optimiser's
    step, skipped when anything is non-finite. (verdict, the weights' finiteness after the update)."""
    cfg, acc, params = run.cfg, run.accelerator, run.params
    # fp16 loss scaling (CUDA only) checks the unscaled gradients itself and makes no update on an overflow, which
    # is how it lowers its scale: that is not a non-finite step. Otherwise the gradients' finiteness (after
    # clipping) joins the loss's in the same sync.
    scaled = acc.scaler is not None
    grads_ok = None
    if not scaled:
        norm = None
        if cfg.optim.max_grad_norm is not None:
            norm = acc.clip_grad_norm_(params, cfg.optim.max_grad_norm)
        grads_ok = grads_finite(params, norm)
    verdict = agree(acc, stop.requested, loss_finite=finite, grads_finite=grads_ok, weights_finite=weights_finite)
    if not verdict.weights_finite:  # the previous update broke the weights: nothing after it is good
        stop_nonfinite_weights(run.out, step, run.main, run.say)
    if verdict.finite:  # a non-finite step makes no update at all (moments, weights, decay)
        if scaled and cfg.optim.max_grad_norm is not None:
            acc.clip_grad_norm_(params, cfg.optim.max_grad_norm)
        run.optimizer.step()
        weights_finite = all_finite(params)  # an update can overflow finite gradients into inf weights
    run.optimizer.zero_grad(set_to_none=True)
    return verdict, weights_finite


def after_step(run: Run, logs: RunLogs, step: int, verdict, weights_finite, stop: GracefulStop) -> None:
    """Validation, the drift probe, the checkpoint, samples and an early stop, each on the steps it is due."""
    cfg, acc, main = run.cfg, run.accelerator, run.main
    validating = validation_due(step, cfg)
    if run.validation is not None and validating:  # the unwrapped models: only the main process runs it
        run_validation(run.validation, run.comps, acc, logs.metrics, step)
    if run.probe is not None and (step == cfg.train.max_steps or (cfg.reg.probe_every and step % cfg.reg.probe_every == 0)
                                  or (validating and cfg.validation.with_probe)):
        run_probe(run.probe, acc, logs.probe, step)
    must_stop = run.nonfinite.exhausted or verdict.stop_signal
    sampling = sample_due(step, cfg.train.max_steps, cfg.sample) or (validating and cfg.validation.with_samples)
    saving = must_stop or checkpoint_due(step, cfg) or sampling
    if saving and not bool(weights_finite):  # one more host sync, only at steps that write or sample
        stop_nonfinite_weights(run.out, step, main, run.say)
    if must_stop or checkpoint_due(step, cfg):
        checkpoint = run.checkpointer.save(step, run.nonfinite.state_dict())
        if main:
            logs.flush()
    if main and sampling:  # the pipeline runs its text encoders beside the denoiser: offloaded ones come over for it
        with encoders_on(run.comps.text_encoders, acc.device):
            sample_during_training(cfg, run.comps, acc, run.denoiser, run.encoders, run.out, step)
    if must_stop:
        stop.uninstall()
        logs.progress.close()
        stop_early(run.out, step, checkpoint, run.export, main, run.nonfinite, verdict.stop_signal, run.say)
    logs.progress.update(1)


class RunLogs:
    """metrics.jsonl, probe.jsonl (each cut back to `resume_step` when resuming) and the progress bar."""

    def __init__(self, out: Path, resume_step: int | None, progress):
        self.metrics = JsonlLog(out / "metrics.jsonl", resume_step=resume_step)
        self.probe = JsonlLog(out / "probe.jsonl", resume_step=resume_step)
        self.progress = progress

    def flush(self) -> None:
        self.metrics.flush()
        self.probe.flush()

    def close(self, main: bool) -> None:
        self.progress.close()
        if main:
            self.flush()


def log_step(run: Run, logs: RunLogs, step: int, sums: dict, micro_batches: int, applied_lrs: dict) -> None:
    """Means over the step's micro-batches, then over processes: what this step's update was computed from."""
    means = torch.stack(list(sums.values())) / micro_batches
    metrics = dict(zip(sums, run.accelerator.gather(means[None]).mean(0).tolist()))
    loss_value = metrics["loss"]  # the .tolist() above is the only host sync, and only at logging steps
    run.losses.append(loss_value)
    metrics.update({f"lr/{name}": lr for name, lr in applied_lrs.items()})
    if run.regulariser is not None:
        metrics.update(run.regulariser.cache_hits())
    run.accelerator.log(metrics, step=step)
    metrics["nonfinite_steps"] = run.nonfinite.total
    if run.main:
        logs.metrics.append(step, metrics)
    logs.progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{next(iter(applied_lrs.values())):.2e}", refresh=False)


# ------------------------------------------------------------------------------------------- helpers


def step_scalars(loss, parts: MicroBatch, regulariser) -> dict:
    """One micro-batch's logged scalars (detached, on the device); `loss` as backpropagated."""
    scalars = {"loss": loss.detach(), "diffusion_loss": parts.diffusion_loss.detach()}
    if parts.preservation is not None:
        scalars["preservation/loss"] = parts.preservation.detach()  # unweighted; only at steps where the term ran
    if parts.reg is not None:
        scalars.update(regulariser.scalars(parts.reg))
    return {k: v.float() for k, v in scalars.items()}


def checkpoint_due(step: int, cfg: Config) -> bool:
    every = cfg.checkpoint.every_steps
    return step == cfg.train.max_steps or bool(every and step % every == 0)


def run_probe(probe, accelerator, probe_log: JsonlLog, step: int) -> dict:
    stats = probe.measure()
    accelerator.log(stats, step=step)
    probe_log.append(step, stats)  # rewritten atomically at flushes, like metrics.jsonl
    return stats


def run_validation(validation, comps, accelerator, metrics_log: JsonlLog, step: int) -> float:
    value = validation.measure(comps.denoiser, list(comps.text_encoders.values()), accelerator)
    accelerator.log({"validation/loss": value}, step=step)
    metrics_log.append(step, {"validation/loss": value})  # its own record in metrics.jsonl
    return value


def progress_bar(total: int, disable: bool, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=disable, dynamic_ncols=True)


def tracker_init_kwargs(cfg: Config, out: Path) -> dict:
    """wandb: the run is named output.name and keeps its files in the run folder, beside TensorBoard's."""
    return {"wandb": {"name": cfg.output.name, "dir": str(out / "logs")}} if cfg.log.tracker == "wandb" else {}


def tracker_hparams(cfg: Config) -> dict:
    return {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "lr": cfg.optim.lr, "text_encoder_lr": cfg.text_encoder_lr,
            "batch_size": cfg.train.batch_size, "max_steps": cfg.train.max_steps, "init": cfg.lora.init,
            "learnable_alpha": cfg.lora.learnable_alpha, "resolution": cfg.top_resolution()}
