"""One training step's forward: the only place training, validation, the row Fisher estimate and output
preservation call a denoiser (sampling goes through the family's diffusers pipeline).

    noised = objective.noised(x0, noise, times)                 the noise process (model/objective.py)
    pred   = predict(family, denoiser, noised.noisy, noised.timesteps, cond, batch)    the family's denoiser call
    loss   = step_loss(...)                                      pred vs the objective's target, its per-example
                                                                 weight, the batch's loss weights and masks

`micro_batch_loss` is the training loop's whole forward of one micro-batch around them (draws, conditioning,
penalties). Adapters on or off is the caller's (`lora.layers.adapters_disabled` around `predict` gives the base model's
prediction). `autocast` is the accelerator's (mixed precision) or none.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from sdlora.model.objective import Noised
from sdlora.model.text import tokenize
from sdlora.training.draws import GlobalBatchDraws
from sdlora.training.losses import weighted_loss


def predict(family, denoiser, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning, batch: dict | None,
            autocast=contextlib.nullcontext) -> torch.Tensor:
    """The denoiser's prediction (B, C, h, w) on `noisy` (B, C, h, w) at `timesteps` (B,) (`Noised.noisy` and
    `.timesteps`), through the family's call (`ModelFamily.predict`)."""
    with autocast():
        return family.predict(denoiser, noisy, timesteps, conditioning, batch)


def step_loss(objective, family, denoiser, noised: Noised, conditioning, batch: dict, loss_cfg,
              autocast=contextlib.nullcontext) -> torch.Tensor:
    """The diffusion loss of a batch (a scalar, fp32): `loss.type` of the objective's prediction against its
    target (with the objective's Huber parameter where it schedules one), times the objective's per-example weight
    (min-SNR, debiased estimation) and the batch's `loss_weight`, under the batch's `loss_mask` (B, 1, h, w) where it
    has one; the mean over the batch."""
    pred = predict(family, denoiser, noised.noisy, noised.timesteps, conditioning, batch, autocast)
    return weighted_loss(objective.prediction(pred, noised), noised.target, loss_cfg, noised.weight,
                         batch.get("loss_weight"), mask=batch.get("loss_mask"), huber_delta=noised.huber_delta)


@dataclass
class MicroBatch:
    """One micro-batch's loss (what is backpropagated) and its parts (logged): the diffusion loss, the
    embedding-norm penalty's terms (None when off) and the unweighted preservation term (None when not due)."""

    loss: torch.Tensor
    diffusion_loss: torch.Tensor
    reg: dict | None = None
    preservation: torch.Tensor | None = None


def micro_batch_loss(run, batch: dict, step: int) -> MicroBatch:
    """The training forward of one micro-batch of optimiser step `step` (1-based), `run` a training/setup.Run:
    latents sampled from the VAE's distribution and drawn on by the objective (GlobalBatchDraws: in that order from
    the run's noise generator), the conditioning (cached or encoded, with gradient when the text encoder trains),
    `step_loss`, then the embedding-norm penalty and the preservation term on their steps."""
    cfg, acc, comps, objective = run.cfg, run.accelerator, run.comps, run.objective
    with torch.no_grad():
        mean, std = run.data.latent_distribution(batch, comps.vae)
        draws = GlobalBatchDraws(run.noise_gen, mean, cfg.train.batch_size, acc)
        x0 = objective.latents(mean + std * draws.randn())
    noised = objective.noised(x0, *objective.draw(draws, x0))
    input_ids = [tokenize(t, batch["captions"], cfg.data.max_token_length).to(acc.device) for t in comps.tokenizers]
    if run.text_cache is not None:
        embeddings = run.text_cache(input_ids)
    else:
        with torch.set_grad_enabled(cfg.text_encoder.train):
            embeddings = comps.family.encode(run.encoders, input_ids, cfg.text_encoder.clip_skip)
    diffusion = step_loss(objective, comps.family, run.denoiser, noised, embeddings, batch, cfg.loss, acc.autocast)
    out = MicroBatch(diffusion, diffusion)
    if run.regulariser is not None:
        out.reg = run.regulariser(input_ids, embeddings)  # each of the family's text outputs held on its own
        out.loss = run.regulariser.add_to(diffusion, out.reg)
    if run.preservation is not None and run.preservation.due(step):  # the base prediction on the same noisy input
        # The unwrapped modules: a second forward through a DDP wrapper before the one backward would mark its
        # parameters ready twice; through the module itself, autograd sums both uses' gradients into one
        # accumulation per parameter, and DDP averages that sum across processes as usual.
        out.preservation = run.preservation(acc.unwrap_model(run.denoiser), [acc.unwrap_model(e) for e in run.encoders],
                                            noised.noisy, noised.timesteps, batch, step, acc.autocast)
        out.loss = out.loss + cfg.reg.preservation.weight * out.preservation
    return out
