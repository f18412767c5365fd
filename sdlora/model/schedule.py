"""The noise schedule a model trains and samples with: its prediction type and zero terminal SNR.

Zero terminal SNR (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed"): the betas
are rescaled so that the last timestep's signal-to-noise ratio is exactly 0, i.e. the last training input is
pure noise, as sampling starts from. Only v-prediction can learn that step (at SNR 0 an epsilon model is asked
for the noise it was given, and tells the sampler nothing about the image), so it is refused with epsilon. The
paper's sampling fixes go with it: start at the last timestep (`timestep_spacing="trailing"`) and rescale
classifier-free guidance (phi = 0.7) against over-exposure. diffusers calls the schedule `rescale_betas_zero_snr`.
"""

from __future__ import annotations

import inspect

from sdlora.errors import UserError

GUIDANCE_RESCALE = 0.7  # the paper's phi (its section 3.4)


def zero_terminal_snr_of(scheduler) -> bool:
    return bool(scheduler.config.get("rescale_betas_zero_snr", False))


def set_noise_schedule(comps, prediction_type: str | None = None, zero_terminal_snr: bool | None = None) -> None:
    """Apply model.prediction_type / model.zero_terminal_snr (None: keep what the model says) to the noise
    scheduler, so the training target and every name derived from it follow; refuse zero SNR with epsilon."""
    sched = comps.noise_scheduler
    if "prediction_type" not in sched.config:  # rectified flow (SD3): its family refuses both keys by name
        return
    changes = {}
    if prediction_type and prediction_type != sched.config.prediction_type:
        changes["prediction_type"] = prediction_type
    if zero_terminal_snr is not None and zero_terminal_snr != zero_terminal_snr_of(sched):
        changes["rescale_betas_zero_snr"] = zero_terminal_snr
    if changes:
        comps.noise_scheduler = type(sched).from_config(sched.config, **changes)
    if zero_terminal_snr_of(comps.noise_scheduler) and comps.prediction_type != "v_prediction":
        said = ("model.zero_terminal_snr" if zero_terminal_snr else
                f"model.path: {comps.source} (zero terminal SNR in its scheduler config or ztsnr key)")
        raise UserError(f"{said}: zero terminal SNR needs v-prediction, and the model predicts "
                        f"{comps.prediction_type} (set model.prediction_type: v_prediction, or "
                        "model.zero_terminal_snr: false)")


def inference_schedule(scheduler, prediction_type: str, zero_terminal_snr: bool):
    """`scheduler` (a pipeline's inference scheduler) predicting `prediction_type`, on the training schedule; a
    rectified-flow scheduler (SD3: no prediction type) as it is."""
    if "prediction_type" not in scheduler.config:
        return scheduler
    if scheduler.config.prediction_type != prediction_type or zero_terminal_snr_of(scheduler) != zero_terminal_snr:
        scheduler = type(scheduler).from_config(scheduler.config, prediction_type=prediction_type,
                                                **({"rescale_betas_zero_snr": False} if not zero_terminal_snr else {}))
    return for_sampling(scheduler, zero_terminal_snr)


def for_sampling(scheduler, zero_terminal_snr: bool):
    """An inference scheduler on the training schedule: with zero terminal SNR, rescaled betas and trailing
    timesteps (a scheduler class that cannot rescale its betas, e.g. PNDM, is replaced by DDIM, the paper's)."""
    if not zero_terminal_snr:
        return scheduler
    from diffusers import DDIMScheduler

    cls = type(scheduler)
    if "rescale_betas_zero_snr" not in inspect.signature(cls.__init__).parameters:
        cls = DDIMScheduler
    return cls.from_config(scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing")


def guidance_rescale(sample_cfg, zero_terminal_snr: bool) -> float:
    """sample.guidance_rescale, else the paper's 0.7 with zero terminal SNR and 0 (off) without."""
    if sample_cfg.guidance_rescale is not None:
        return sample_cfg.guidance_rescale
    return GUIDANCE_RESCALE if zero_terminal_snr else 0.0
