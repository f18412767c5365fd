"""Everything a run builds before its first step, in the order it is built (the global RNG draws of the adapters'
inits and the data order depend on it): the model and its adapters, the data, the optimiser, the step's parts
(objective, noise generator, penalties, validation, probe) and the checkpointer."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdlora import config_effects
from sdlora.adapter.run_record import RunRecord
from sdlora.config import Config
from sdlora.lora import build_param_groups, inject_all
from sdlora.model.components import Components
from sdlora.model.loading import load_components
from sdlora.reg.probe import family_probe
from sdlora.training import preflight
from sdlora.training.checkpoint import Checkpointer
from sdlora.training.ema import make_ema
from sdlora.training.export import Exporter
from sdlora.training.nonfinite import NonFiniteCounter
from sdlora.training.offload import text_encoder_device
from sdlora.training.optim import check_rates, make_lr_scheduler, make_optimizer
from sdlora.training.periodic_merge import PeriodicMerge
from sdlora.training.placement import WEIGHT_DTYPES, place_models
from sdlora.training.preservation import make_preservation
from sdlora.training.text_cache import make_text_cache
from sdlora.training.validation import make_validation


@dataclass
class Run:
    """What the loop, the step (training/step.py) and the after-step work read. `denoiser` and `encoders` are the
    models as Accelerate prepared them (wrapped under data parallelism); `comps` holds the unwrapped ones."""

    cfg: Config
    accelerator: object
    out: Path
    main: bool
    say: object
    comps: Components
    layers: dict
    data: object
    optimizer: object
    lr_scheduler: object
    denoiser: torch.nn.Module
    encoders: list
    trained: list  # the models whose gradients accumulate (accelerator.accumulate)
    params: list  # every trained tensor (clipping, finiteness)
    objective: object  # model/objective.py: the family's noise process
    noise_gen: torch.Generator
    regulariser: object
    text_cache: object
    preservation: object
    probe: object
    validation: object
    export: Exporter
    ema: object
    checkpointer: Checkpointer
    nonfinite: NonFiniteCounter
    losses: list = field(default_factory=list)  # the logged loss of each logged step
    merges: object = None  # training/periodic_merge.PeriodicMerge (lora.merge_every)


def build_model(cfg: Config, say):
    """(components, adapter layers, optimiser groups): the base model loaded and checked, adapters injected; the
    config's keys with no effect on this model reported through `say`."""
    comps = load_components(cfg.model.path, vae_path=cfg.model.vae_path, config_dir=cfg.model.config_dir,
                            allow_pickle=cfg.model.allow_pickle, prediction_type=cfg.model.prediction_type,
                            zero_terminal_snr=cfg.model.zero_terminal_snr,
                            text_encoders_path=cfg.model.text_encoders_path)
    preflight.against_model(cfg, comps)
    comps.family = comps.family.for_run(comps, cfg)  # SD3: its transformer's text width and T5's length
    for line in config_effects.check(cfg, config_effects.ModelFacts.of(cfg, comps)):  # keys with no effect here
        say(line)
    if cfg.model.base_precision != "full":  # said before --dry-run's table too: nothing else shows it
        say(f"sdlora: model.base_precision {cfg.model.base_precision}: the frozen Linear and Conv2d weights of the "
            f"denoiser and text encoders are stored in {cfg.model.base_precision} and upcast to "
            f"{cfg.train.mixed_precision} layer by layer; adapters (fp32), norms, embeddings and the VAE keep theirs")
    layers = inject_all(comps.adaptable(), cfg, comps.family)
    groups = build_param_groups(layers, cfg, comps.family)
    check_rates(groups.groups, cfg)  # rates the optimiser cannot take: before --dry-run's table
    return comps, layers, groups


def prepare_run(cfg: Config, accelerator, out: Path, main: bool, say, comps: Components, layers: dict, groups) -> Run:
    text_device = text_encoder_device(cfg, accelerator.device)  # text_encoder.offload: the CPU, or the device
    place_models(comps, layers, accelerator.device, WEIGHT_DTYPES[cfg.train.mixed_precision], cfg, text_device)
    if text_device != accelerator.device:
        say(f"sdlora: the frozen text encoders stay on {text_device} (text_encoder.offload); each new caption is "
            f"encoded there once and its output cached on {accelerator.device}")
    data = make_data(cfg, comps, accelerator, say)
    optimizer = make_optimizer(groups.groups, cfg)
    lr_scheduler = make_lr_scheduler(optimizer, cfg)
    encoders = list(comps.text_encoders.values())  # the family's text encoders, in the order its conditioning reads them
    trained = [comps.denoiser] + (encoders if cfg.text_encoder.train else [])
    # The LR schedule is stepped by the loop once per optimiser step (Accelerate's wrapper would step it once
    # per process under data parallelism).
    prepared = accelerator.prepare(*trained, optimizer)  # the data is sharded by sdlora.data, not by Accelerate
    if cfg.text_encoder.train:
        encoders = list(prepared[1:-1])
    # One stream for all processes: each draws the whole global batch and keeps its slice (see GlobalBatchDraws).
    noise_gen = torch.Generator(device=accelerator.device).manual_seed(cfg.train.seed)
    objective = comps.family.objective(comps.noise_scheduler, comps.vae.config, cfg.loss)
    # The regulariser's base-norm misses and the probe run on some processes only: they use the unwrapped
    # encoder (a DDP-wrapped forward is a collective and would wait forever for the other processes).
    regulariser = make_regulariser(cfg, comps, say)
    text_cache = make_text_cache(cfg, encoders, comps.family)  # frozen encoders: each caption encoded once
    # reg.preservation: None when its weight is 0; each process draws its slice of the global batch's prompts
    preservation = make_preservation(cfg, comps, data, accelerator.process_index, accelerator.num_processes, text_cache)
    probe = make_probe(cfg, comps) if main else None
    validation = make_validation(cfg, comps, data, objective, say, text_cache) if main else None  # held-out loss
    export = Exporter(layers, cfg, RunRecord.from_training(cfg, comps))  # what every exported file says about this run
    ema = make_ema(cfg, layers, accelerator.device)  # train.ema: an average of the adapter, saved with checkpoints
    merges = (PeriodicMerge(layers, cfg.lora.merge_every, cfg.train.max_steps, cfg.train.seed, prepared[-1])
              if cfg.lora.merge_every else None)  # lora.merge_every: ReLoRA's merge-and-restart
    checkpointer = Checkpointer(out, accelerator, layers, prepared[-1], lr_scheduler, noise_gen, export,
                                keep_last=cfg.checkpoint.keep_last,
                                keep_adapters=cfg.checkpoint.keep_adapters, data=data, ema=ema, merges=merges)
    return Run(cfg, accelerator, out, main, say, comps, layers, data, prepared[-1], lr_scheduler, prepared[0], encoders,
               trained, [p for g in groups.groups for p in g["params"]], objective, noise_gen, regulariser, text_cache,
               preservation, probe, validation, export, ema, checkpointer, NonFiniteCounter(cfg.train.max_nonfinite_steps),
               merges=merges)


def resume_from(run: Run, folder: Path) -> int:
    """Restore checkpoint `folder` (adapters, optimiser, schedule, generators, data order, EMA, counters): its step."""
    state = run.checkpointer.restore(folder)
    run.nonfinite.load_state_dict(state.get("counters", {}))
    run.say(f"sdlora: resumed from {folder} at step {state['step']}")
    return int(state["step"])


def make_data(cfg: Config, comps: Components, accelerator, say):
    from sdlora.data import build_training_data

    return build_training_data(cfg, comps, num_processes=accelerator.num_processes,
                               process_index=accelerator.process_index, say=say)


def make_regulariser(cfg: Config, comps: Components, say):
    from sdlora.reg.embedding_norm import TextRegulariser

    en = cfg.reg.embedding_norm
    if en.direction_weight == 0 and not any(en.weight_of(output, comps.family) for output, _, _ in comps.family.text_outputs):
        return None  # no extra text-encoder pass at all
    if not cfg.text_encoder.train:  # its keys were reported at start (config_effects.py)
        return None
    return TextRegulariser(comps.family, comps.text_encoders, dict(zip(comps.text_encoders, comps.tokenizers)), cfg)


def make_probe(cfg: Config, comps: Components):
    return family_probe(comps.family, comps.text_encoders, dict(zip(comps.text_encoders, comps.tokenizers)),
                        cfg.reg.probe_prompts, cfg.text_encoder.clip_skip, cfg.data.max_token_length)
