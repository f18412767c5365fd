"""The training loop. Set-up, loop, export: helpers carry the detail, this file carries the story."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdlora.adapter.run_record import RunRecord
from sdlora.config import Config, dump_yaml
from sdlora.lora import build_param_groups, inject_all, trainable_count
from sdlora.lora.layers import AdapterLayer
from sdlora.model.components import Components
from sdlora.model.loading import load_components
from sdlora.model.text import tokenize
from sdlora.reg.preservation import make_preservation
from sdlora.reg.probe import family_probe
from sdlora.training import preflight
from sdlora.training.checkpoint import Checkpointer, find_checkpoint
from sdlora.training.draws import GlobalBatchDraws
from sdlora.training.ema import export_ema, make_ema
from sdlora.training.export import UI_FILE, export_adapter, export_for_uis
from sdlora.training.fisher import store_run_fisher
from sdlora.training.losses import diffusion_loss, diffusion_target
from sdlora.training.nonfinite import NonFiniteCounter, agree, all_finite, grads_finite
from sdlora.training.optim import check_rates, make_lr_scheduler, make_optimizer
from sdlora.training.placement import WEIGHT_DTYPES, place_models
from sdlora.training.run_folder import (
    RunStart,
    check_output_dir,
    finish_run,
    stop_early,
    stop_nonfinite_weights,
    write_final_adapter,
)
from sdlora.training.sampling import sample_due, sample_during_training
from sdlora.training.signals import GracefulStop
from sdlora.training.text_cache import make_text_cache
from sdlora.training.validation import make_validation, validation_due
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
    preflight.with_processes(cfg, accelerator.num_processes)
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


def _train(cfg: Config, accelerator, out: Path, main: bool, say, run: RunStart, *, resume, dry_run, fault_hook,
           stop: GracefulStop) -> TrainResult:
    from accelerate.utils import set_seed

    set_seed(cfg.train.seed)

    # ---- model and adapters
    comps = load_components(cfg.model.path, vae_path=cfg.model.vae_path, config_dir=cfg.model.config_dir,
                            allow_pickle=cfg.model.allow_pickle, prediction_type=cfg.model.prediction_type,
                            zero_terminal_snr=cfg.model.zero_terminal_snr)
    preflight.against_model(cfg, comps)
    layers = inject_all(comps.unet, comps.text_encoders, cfg)
    groups = build_param_groups(layers, cfg, comps.family)
    check_rates(groups.groups, cfg)  # rates the optimiser cannot take: before --dry-run's table
    if dry_run:
        from sdlora.util.tables import plan_table

        say(plan_table(layers, groups, cfg))
        return TrainResult(out, None, comps, layers)
    say(f"sdlora: {len(layers)} adapted modules, {trainable_count(layers):,} trainable parameters")
    weight_dtype = WEIGHT_DTYPES[cfg.train.mixed_precision]
    place_models(comps, layers, accelerator.device, weight_dtype, cfg)

    # ---- data
    data = make_data(cfg, comps, accelerator, say)

    # ---- optimiser and schedule
    optimizer = make_optimizer(groups.groups, cfg)
    lr_scheduler = make_lr_scheduler(optimizer, cfg)
    encoders = list(comps.text_encoders.values())  # the family's text encoders, in the order its conditioning reads
    trained = [comps.unet] + (encoders if cfg.text_encoder.train else [])
    # The LR schedule is stepped here once per optimiser step (Accelerate's wrapper would step it once
    # per process under data parallelism).
    prepared = accelerator.prepare(*trained, optimizer)  # the data is sharded by sdlora.data, not by Accelerate
    unet = prepared[0]
    if cfg.text_encoder.train:
        encoders = list(prepared[1:-1])
    optimizer = prepared[-1]

    # One stream for all processes: each draws the whole global batch and keeps its slice (see GlobalBatchDraws).
    noise_gen = torch.Generator(device=accelerator.device).manual_seed(cfg.train.seed)
    scheduler, family = comps.noise_scheduler, comps.family  # the family turns token ids into the UNet's conditioning
    t_max = cfg.loss.max_timestep or scheduler.config.num_train_timesteps
    params = [p for g in groups.groups for p in g["params"]]
    # The regulariser's base-norm misses and the probe run on some processes only: they use the unwrapped
    # encoder (a DDP-wrapped forward is a collective and would wait forever for the other processes).
    regulariser = make_regulariser(cfg, comps, say)
    text_cache = make_text_cache(cfg, encoders, comps.family)  # frozen encoders: each caption encoded once
    # reg.preservation: None when its weight is 0; each process draws its slice of the global batch's prompts
    preservation = make_preservation(cfg, comps, data, accelerator.process_index, accelerator.num_processes)
    probe = make_probe(cfg, comps) if main else None
    validation = make_validation(cfg, comps, data, t_max, say) if main else None  # fixed held-out loss

    # ---- checkpoints and resume: everything stateful is saved together and restored before the first batch
    record = RunRecord.from_training(cfg, comps)  # what every exported file says about this run

    def export(path, at_step, report=None):
        export_adapter(layers, path, cfg, record, steps=at_step, report=report)

    ema = make_ema(cfg, layers, accelerator.device)  # train.ema: an average of the adapter, saved with checkpoints
    checkpointer = Checkpointer(out, accelerator, layers, optimizer, lr_scheduler, noise_gen, export,
                                keep_last=cfg.checkpoint.keep_last, data=data, ema=ema)
    nonfinite = NonFiniteCounter(cfg.train.max_nonfinite_steps)
    step = 0
    if resume is not None:
        step = resume_from(checkpointer, find_checkpoint(out, resume, say), nonfinite, say)

    # ---- start: every input check has passed; only now is the run folder written (an old run replaced)
    run.begin(dump_yaml(cfg))
    if main and accelerator.log_with:  # the trackers asked for and installed (accelerator.trackers is empty until init)
        accelerator.init_trackers("sdlora", config=tracker_hparams(cfg), init_kwargs=tracker_init_kwargs(cfg, out))
    accelerator.wait_for_everyone()
    metrics_log = JsonlLog(out / "metrics.jsonl", resume_step=step if resume else None)
    probe_log = JsonlLog(out / "probe.jsonl", resume_step=step if resume else None)

    # ---- loop
    losses = []
    first_step = step  # 0, or the step resumed from
    progress = progress_bar(cfg.train.max_steps, disable=not main, initial=step)
    batches = data.batches()
    finite = torch.ones((), dtype=torch.bool, device=accelerator.device)
    weights_finite = finite.clone()  # after the latest update; read with the next verdict, or before a save
    sums, micro_batches = {}, 0  # this step's logged scalars summed over its micro-batches, on the device
    stop.install()  # train() uninstalls it however the run ends
    t0 = time.perf_counter()
    while step < cfg.train.max_steps:
        batch = next(batches)
        with accelerator.accumulate(*trained):
            with torch.no_grad():
                mean, std = data.latent_distribution(batch, comps.vae)
                draws = GlobalBatchDraws(noise_gen, mean, cfg.train.batch_size, accelerator)
                latents = (mean + std * draws.randn()) * comps.vae.config.scaling_factor
            noise = draws.noise(cfg.loss.noise_offset)
            timesteps = draws.timesteps(cfg.loss.min_timestep, t_max)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            input_ids = [tokenize(t, batch["captions"], cfg.data.max_token_length).to(accelerator.device)
                         for t in comps.tokenizers]
            if text_cache is not None:
                embeddings = text_cache(input_ids)
            else:
                with torch.set_grad_enabled(cfg.text_encoder.train):
                    embeddings = family.encode(encoders, input_ids, cfg.text_encoder.clip_skip)
            with accelerator.autocast():
                pred = unet(noisy, timesteps, **family.unet_kwargs(embeddings, batch)).sample
            target = diffusion_target(scheduler, latents, noise, timesteps)
            diff_loss = diffusion_loss(pred, target, timesteps, scheduler, cfg.loss, batch["loss_weight"],
                                       batch.get("loss_mask"))
            loss = diff_loss
            if regulariser is not None:
                reg = regulariser(input_ids, embeddings)  # each of the family's text outputs held on its own
                loss = regulariser.add_to(diff_loss, reg)
            kept = None
            if preservation is not None and preservation.due(step + 1):  # the base prediction on the same noisy latents
                # The unwrapped modules: a second forward through a DDP wrapper before the one backward would mark
                # its parameters ready twice; through the module itself, autograd sums both uses' gradients into
                # one accumulation per parameter, and DDP averages that sum across processes as usual.
                kept = preservation(accelerator.unwrap_model(unet), [accelerator.unwrap_model(e) for e in encoders],
                                    noisy, timesteps, batch, step + 1, accelerator.autocast)
                loss = loss + cfg.reg.preservation.weight * kept
            if fault_hook is not None:
                loss = fault_hook(step + 1, loss)
            accelerator.backward(loss)
            micro_batches += 1
            for name, value in step_scalars(loss, diff_loss, regulariser, reg if regulariser is not None else None,
                                            kept).items():
                sums[name] = sums[name] + value if name in sums else value
            finite = finite & torch.isfinite(loss.detach())  # on the device: no host sync here
            if accelerator.sync_gradients:
                # fp16 loss scaling (CUDA only) checks the unscaled gradients itself and makes no update on an
                # overflow, which is how it lowers its scale: that is not a non-finite step. Otherwise the
                # gradients' finiteness (after clipping) joins the loss's in the same sync.
                scaled = accelerator.scaler is not None
                grads_ok = None
                if not scaled:
                    norm = None
                    if cfg.optim.max_grad_norm is not None:
                        norm = accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm)
                    grads_ok = grads_finite(params, norm)
                verdict = agree(accelerator, stop.requested, loss_finite=finite, grads_finite=grads_ok,
                                weights_finite=weights_finite)  # the one host sync per step
                if not verdict.weights_finite:  # the previous update broke the weights: nothing after it is good
                    stop_nonfinite_weights(out, step, main, say)
                if verdict.finite:  # a non-finite step makes no update at all (moments, weights, decay)
                    if scaled and cfg.optim.max_grad_norm is not None:
                        accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm)
                    optimizer.step()
                    weights_finite = all_finite(params)  # an update can overflow finite gradients into inf weights
                optimizer.zero_grad(set_to_none=True)
                finite = torch.ones_like(finite)
        if not accelerator.sync_gradients:
            continue
        applied_lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}  # this step's rates, logged below
        lr_scheduler.step()  # a skipped step still counts: LR curve, data order and step numbers stay aligned
        step += 1
        if ema is not None:
            ema.update(step)
        nonfinite.record(verdict.finite)
        if not verdict.finite:
            say(f"sdlora: step {step}: {verdict.reason}, step skipped ({nonfinite.consecutive} in a row, "
                f"{nonfinite.total} in all)")
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            # Means over the step's micro-batches, then over processes: what this step's update was computed from.
            means = torch.stack(list(sums.values())) / micro_batches
            metrics = dict(zip(sums, accelerator.gather(means[None]).mean(0).tolist()))
            loss_value = metrics["loss"]  # the .tolist() above is the only host sync, and only at logging steps
            losses.append(loss_value)
            metrics.update({f"lr/{name}": lr for name, lr in applied_lrs.items()})
            if regulariser is not None:
                metrics.update(regulariser.cache_hits())
            accelerator.log(metrics, step=step)
            metrics["nonfinite_steps"] = nonfinite.total
            if main:
                metrics_log.append(step, metrics)
            progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{next(iter(applied_lrs.values())):.2e}", refresh=False)
        sums, micro_batches = {}, 0
        validating = validation_due(step, cfg)
        if validation is not None and validating:  # the unwrapped models: only the main process runs it
            run_validation(validation, comps, accelerator, metrics_log, step)
        if probe is not None and (step == cfg.train.max_steps or (cfg.reg.probe_every and step % cfg.reg.probe_every == 0)
                                  or (validating and cfg.validation.with_probe)):
            run_probe(probe, accelerator, probe_log, step)
        must_stop = nonfinite.exhausted or verdict.stop_signal
        sampling = sample_due(step, cfg.train.max_steps, cfg.sample) or (validating and cfg.validation.with_samples)
        saving = must_stop or checkpoint_due(step, cfg) or sampling
        if saving and not bool(weights_finite):  # one more host sync, only at steps that write or sample
            stop_nonfinite_weights(out, step, main, say)
        if must_stop or checkpoint_due(step, cfg):
            checkpoint = checkpointer.save(step, nonfinite.state_dict())
            if main:
                metrics_log.flush()
                probe_log.flush()
        if main and sampling:
            sample_during_training(cfg, comps, accelerator, unet, encoders, out, step)
        if must_stop:
            stop.uninstall()
            progress.close()
            stop_early(out, step, checkpoint, export, main, nonfinite, verdict.stop_signal, say)
        progress.update(1)
    stop.uninstall()
    progress.close()
    accelerator.wait_for_everyone()
    if main:
        metrics_log.flush()
        probe_log.flush()

    # ---- export
    adapter_path = out / "adapter.safetensors"
    if main:
        write_final_adapter(export, adapter_path, step, checkpointer.latest_intact(), cfg, report=say)
        if cfg.export.fisher_samples:
            store_run_fisher(cfg, adapter_path, accelerator.device, say)
        if ema is not None:
            export_ema(ema, export, out / "adapter_ema.safetensors", step)
        for_uis = export_for_uis(adapter_path, out / UI_FILE, cfg)
        finish_run(out, step, time.perf_counter() - t0)
        ran = f"steps {first_step + 1}-{step} ({step - first_step})" if first_step else f"{step} steps"  # this launch's
        say(f"sdlora: trained {ran} in {time.perf_counter() - t0:.1f}s; adapter: {adapter_path}; {for_uis}")
    accelerator.end_training()
    return TrainResult(out, adapter_path, comps, layers, losses, step)


# ------------------------------------------------------------------------------------------- helpers


def step_scalars(loss, diff_loss, regulariser, reg, preservation=None) -> dict:
    """One micro-batch's logged scalars (detached, on the device)."""
    scalars = {"loss": loss.detach(), "diffusion_loss": diff_loss.detach()}
    if preservation is not None:
        scalars["preservation/loss"] = preservation.detach()  # unweighted; only at steps where the term ran
    if reg is not None:
        scalars.update(regulariser.scalars(reg))
    return {k: v.float() for k, v in scalars.items()}


def checkpoint_due(step: int, cfg: Config) -> bool:
    every = cfg.checkpoint.every_steps
    return step == cfg.train.max_steps or bool(every and step % every == 0)


def resume_from(checkpointer: Checkpointer, folder: Path, nonfinite: NonFiniteCounter, say) -> int:
    state = checkpointer.restore(folder)
    nonfinite.load_state_dict(state.get("counters", {}))
    say(f"sdlora: resumed from {folder} at step {state['step']}")
    return int(state["step"])


def make_data(cfg: Config, comps: Components, accelerator, say):
    from sdlora.data import build_training_data

    return build_training_data(cfg, comps, num_processes=accelerator.num_processes,
                               process_index=accelerator.process_index, say=say)


def make_regulariser(cfg: Config, comps: Components, say):
    from sdlora.reg.embedding_norm import TextRegulariser

    en = cfg.reg.embedding_norm
    if en.direction_weight == 0 and not any(en.weight_of(output) for output, _, _ in comps.family.text_outputs):
        return None  # no extra text-encoder pass at all
    if not cfg.text_encoder.train:
        say("sdlora: reg.embedding_norm.weight is ignored: the text encoder is not trained, its embeddings cannot drift")
        return None
    return TextRegulariser(comps.family, comps.text_encoders, dict(zip(comps.text_encoders, comps.tokenizers)), cfg)


def make_probe(cfg: Config, comps: Components):
    return family_probe(comps.family, comps.text_encoders, dict(zip(comps.text_encoders, comps.tokenizers)),
                        cfg.reg.probe_prompts, cfg.text_encoder.clip_skip, cfg.data.max_token_length)


def run_probe(probe, accelerator, probe_log: JsonlLog, step: int) -> dict:
    stats = probe.measure()
    accelerator.log(stats, step=step)
    probe_log.append(step, stats)  # rewritten atomically at flushes, like metrics.jsonl
    return stats


def run_validation(validation, comps, accelerator, metrics_log: JsonlLog, step: int) -> float:
    value = validation.measure(comps.unet, list(comps.text_encoders.values()), accelerator)
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
            "learnable_alpha": cfg.lora.learnable_alpha, "resolution": cfg.data.resolution}
