"""Keys that have an effect only under a condition: one table, checked in one place.

A key the user set (present in the config with a value other than its default) whose condition does not hold
would be ignored in silence, so each is reported: a warning at start, printed before training and by
`--dry-run` (a config template may carry such keys harmlessly), or an error where the setting is surely a
mistake (it would change nothing the user can see, or drop training data for nothing). `check` evaluates the
table: at validation with the config alone (the errors that need no model), and once at start with what the
loaded model says (`ModelFacts`), which returns the warnings (docs/training.md has the table in words).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from sdlora.config_loss import HUBER_TYPES
from sdlora.errors import UserError


@dataclass(frozen=True)
class ModelFacts:
    """What the model (and the filesystem) say, for the rules that need it."""

    text_encoders: tuple[str, ...]  # the family's text encoders: ("text_encoder",) or (..., "text_encoder_2")
    single_file: bool  # model.path or model.vae_path is a single file: its configs come from model.config_dir
    pickle: bool  # model.path or model.vae_path is a pickle checkpoint (.ckpt, .pt, .pth, .bin)

    @classmethod
    def of(cls, cfg, comps) -> "ModelFacts":
        from sdlora.model.single_file import PICKLE_SUFFIXES

        files = [Path(p).expanduser() for p in (cfg.model.path, cfg.model.vae_path) if p]
        files = [p for p in files if p.is_file()]
        return cls(tuple(comps.text_encoders), bool(files), any(p.suffix.lower() in PICKLE_SUFFIXES for p in files))


@dataclass(frozen=True)
class Rule:
    keys: tuple[str, ...]  # dotted key paths this condition governs
    needs: str  # the condition, in the words of the config: "lora.conv: true"
    holds: Callable  # (cfg, facts) -> bool: whether the keys have an effect here
    error: bool = False  # surely a mistake: refuse
    uses_model: bool = False  # needs ModelFacts (evaluated at start only)


def _te_trained(c) -> bool:
    return c.text_encoder.train


def _samples_on(c) -> bool:
    return bool(c.sample.every_steps) or (bool(c.validation.every_steps) and c.validation.with_samples)


def _embedding_norm_on(c) -> bool:
    e = c.reg.embedding_norm
    return bool(e.weight or e.direction_weight or e.text_encoder_2_weight or e.pooled_weight or
                any(e.output_weights.values()))


# The table. Keys that already fail validation on their own when they cannot apply (reg.preservation's prompt
# keys against its source, lora.train_a with LyCORIS kinds) keep those messages in config.py.
RULES: tuple[Rule, ...] = (
    # model
    Rule(("model.config_dir",), "a single-file model.path or model.vae_path (a diffusers folder has its own "
         "configs)", lambda c, f: f.single_file, uses_model=True),
    Rule(("model.allow_pickle",), "a pickle checkpoint (.ckpt, .pt, .pth, .bin) as model.path or model.vae_path",
         lambda c, f: f.pickle, uses_model=True),
    # data
    Rule(("data.mask_dir",), "data.masked_loss: true", lambda c, f: c.data.masked_loss, error=True),
    Rule(("data.cache_dir",), "data.cache_latents: disk", lambda c, f: c.data.cache_latents == "disk"),
    Rule(("data.cache_text_encoder_outputs",), "text_encoder.train: false (a trained encoder is never cached)",
         lambda c, f: not c.text_encoder.train),
    Rule(("data.text_cache_mb",), "text_encoder.train: false and data.cache_text_encoder_outputs: true",
         lambda c, f: not c.text_encoder.train and c.data.cache_text_encoder_outputs),
    Rule(("text_encoder.offload",), "text_encoder.train: false and data.cache_text_encoder_outputs: true (a trained "
         "or uncached encoder runs every step, on the training device)",
         lambda c, f: not c.text_encoder.train and c.data.cache_text_encoder_outputs),
    Rule(("data.keep_tokens",), "data.shuffle_tags or data.tag_dropout (in data or a subset)",
         lambda c, f: any(s.shuffle_tags or s.tag_dropout for s in c.data_subsets())),
    Rule(("data.min_side", "data.max_side"), "data.bucketing: true", lambda c, f: c.data.bucketing),
    Rule(("data.prior_loss_weight",), "a subset with is_regularization: true",
         lambda c, f: any(s.is_regularization for s in c.data.subsets)),
    Rule(("data.num_workers",), "data.cache_latents: none (cached latents are read from memory)",
         lambda c, f: c.data.cache_latents == "none"),
    # lora and text encoder
    Rule(("lora.conv_rank", "lora.conv_alpha", "lora.conv_targets"), "lora.conv: true", lambda c, f: c.lora.conv),
    Rule(("lora.lokr_factor",), "lora.type: lokr", lambda c, f: c.lora.type == "lokr", error=True),
    Rule(("lora.text_encoder_targets",), "text_encoder.train: true", lambda c, f: _te_trained(c)),
    # optim
    Rule(("optim.text_encoder_lr",), "text_encoder.train: true", lambda c, f: _te_trained(c)),
    Rule(("optim.text_encoder_2_lr",), "text_encoder.train: true", lambda c, f: _te_trained(c)),
    Rule(("optim.text_encoder_2_lr",), "a model with a second text encoder (SDXL)",
         lambda c, f: "text_encoder_2" in f.text_encoders, uses_model=True),
    Rule(("optim.alpha_lr",), "lora.learnable_alpha: true", lambda c, f: c.lora.learnable_alpha),
    # loss
    Rule(("loss.huber_delta", "loss.huber_schedule", "loss.huber_scale"), "loss.type: huber, pseudo_huber or smooth_l1",
         lambda c, f: c.loss.type in HUBER_TYPES),
    Rule(("loss.huber_scale",), "loss.huber_schedule: constant or exponential (snr has no scale)",
         lambda c, f: c.loss.huber_schedule != "snr"),
    Rule(("loss.noise_offset_random_strength", "loss.adaptive_noise_scale"), "loss.noise_offset above 0",
         lambda c, f: bool(c.loss.noise_offset)),
    Rule(("loss.multires_noise_discount",), "loss.multires_noise_iterations above 0",
         lambda c, f: bool(c.loss.multires_noise_iterations)),
    Rule(("loss.ip_noise_random_strength",), "loss.ip_noise_gamma above 0", lambda c, f: bool(c.loss.ip_noise_gamma)),
    Rule(("loss.logit_mean", "loss.logit_std"), "loss.timestep_sampling: logit_normal",
         lambda c, f: c.loss.timestep_sampling == "logit_normal"),
    Rule(("loss.mode_scale",), "loss.timestep_sampling: mode", lambda c, f: c.loss.timestep_sampling == "mode"),
    # regularisers
    Rule(("reg.embedding_norm.weight", "reg.embedding_norm.direction_weight", "reg.embedding_norm.text_encoder_2_weight",
          "reg.embedding_norm.pooled_weight", "reg.embedding_norm.output_weights"),
         "text_encoder.train: true (a frozen encoder's embeddings cannot drift)",
         lambda c, f: _te_trained(c)),
    Rule(("reg.embedding_norm.text_encoder_2_weight", "reg.embedding_norm.pooled_weight"),
         "a model with a second text encoder (SDXL)", lambda c, f: "text_encoder_2" in f.text_encoders, uses_model=True),
    Rule(("reg.embedding_norm.norm", "reg.embedding_norm.tokens", "reg.embedding_norm.reduce",
          "reg.embedding_norm.cache_size"), "a reg.embedding_norm weight above 0", lambda c, f: _embedding_norm_on(c)),
    Rule(("reg.embedding_norm.direction_prompts", "reg.embedding_norm.pinned_prompts"),
         "reg.embedding_norm.direction_weight above 0", lambda c, f: bool(c.reg.embedding_norm.direction_weight)),
    Rule(("reg.preservation.source", "reg.preservation.prompts", "reg.preservation.prompts_file",
          "reg.preservation.trigger_words", "reg.preservation.every_steps"), "reg.preservation.weight above 0",
         lambda c, f: bool(c.reg.preservation.weight)),
    # samples, validation, checkpoints, EMA, export
    Rule(("sample.prompts", "sample.entries", "sample.prompts_file", "sample.num_inference_steps", "sample.guidance_scale", "sample.guidance_rescale",
          "sample.seed", "sample.negative_prompt", "sample.width", "sample.height", "sample.skip_layer_guidance"),
         "sample.every_steps above 0 (or validation.with_samples)", lambda c, f: _samples_on(c)),
    # classifier-free guidance runs only above 1 (diffusers' do_classifier_free_guidance): no negative branch
    Rule(("sample.negative_prompt", "sample.guidance_rescale", "sample.skip_layer_guidance"), "sample.guidance_scale above 1 (or a sample's own)",
         lambda c, f: c.sample.guidance_scale > 1 or bool(c.sample.prompts_file)
         or any((e.guidance_scale or 0) > 1 for e in c.sample.entries)),
    Rule(("validation.path", "validation.timesteps", "validation.seed", "validation.with_probe",
          "validation.with_samples"), "validation.every_steps above 0", lambda c, f: bool(c.validation.every_steps)),
    # held out of training for a validation that never runs: the run would lose images for nothing
    Rule(("validation.num_images",), "validation.every_steps above 0", lambda c, f: bool(c.validation.every_steps),
         error=True),
    Rule(("checkpoint.keep_last", "checkpoint.keep_adapters"),
         "checkpoint.every_steps above 0 (otherwise one checkpoint, at the end)",
         lambda c, f: bool(c.checkpoint.every_steps)),
    Rule(("train.ema.decay", "train.ema.start_step", "train.ema.device"), "train.ema.enabled: true",
         lambda c, f: c.train.ema.enabled),
    Rule(("export.reduce_rank",), "lora.init: compensated or principal (the inits exported at rank 2r) or "
         "lora.merge_every above 0", lambda c, f: c.lora.init in ("compensated", "principal") or bool(c.lora.merge_every)),
)


def given(cfg, key: str) -> bool:
    """Whether the user set `key`: present in the config, with a value other than the default."""
    *path, name = key.split(".")
    section = cfg
    for part in path:
        section = getattr(section, part)
    if name not in section.model_fields_set:
        return False
    default = type(section).model_fields[name].get_default(call_default_factory=True)
    return getattr(section, name) != default


def check(cfg, facts: Optional[ModelFacts] = None) -> list[str]:
    """Evaluate the table. Without `facts` (validation): only the rules that need no model, and only their errors
    (a `UserError`). With `facts` (once, at start): every rule; errors raise, warnings are returned, one line each."""
    warnings = []
    for rule in RULES:
        if rule.uses_model and facts is None:
            continue
        idle = [k for k in rule.keys if given(cfg, k)]
        if not idle or rule.holds(cfg, facts):
            continue
        what = idle[0] if len(idle) == 1 else f"{', '.join(idle[:-1])} and {idle[-1]}"
        line = f"{what} {'is' if len(idle) == 1 else 'are'} set but {'has' if len(idle) == 1 else 'have'} effect " \
               f"only with {rule.needs}"
        if rule.error:
            raise UserError(line + " (set it, or drop the key)")
        if facts is not None:
            warnings.append(f"sdlora: warning: {line}; ignored")
    return warnings
