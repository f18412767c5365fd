"""SD3 and SD3.5: the family class (an MMDiT transformer called with keyword arguments, CLIP-L, CLIP-G and an
optional T5, rectified flow) and the conditioning it gives the transformer. Its instances (SD3 Medium, SD3.5
Medium, SD3.5 Large: one per kohya model type, recognised from the transformer's config) are registered in
model/families.py; the parts are model/parts.SD3_PARTS.

Conditioning is model/sd3_text.py's, which equals `StableDiffusion3Pipeline.encode_prompt`: each CLIP's penultimate
hidden states (no final layer norm) side by side, zero-padded to the transformer's `joint_attention_dim`, then T5's
tokens (or, without T5, zeros of `text_encoder.t5_max_length` tokens, as the pipeline feeds); the pooled vector is
both CLIPs' projected pooled outputs side by side. A dropped caption is the caption "" (the pipeline's negative
prompt), which the data pipeline already gives: nothing is zeroed here. The padding and T5's zeros are added in
`predict`, where the transformer's width is known, so the cached conditioning holds only what the encoders made.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from sdlora.config_loss import ddpm_keys_set
from sdlora.errors import UserError
from sdlora.model.family_base import ModelFamily

CLIP_TOKENS = 77  # each CLIP's window: the first 77 of the transformer's text tokens
# kohya model type -> the bundled configs' folder under sdlora/resources/configs (named as Stability's releases)
BUNDLED_FOLDERS = {"medium": "sd3_medium", "5-medium": "sd3.5_medium", "5-large": "sd3.5_large"}


@dataclass
class SD3Conditioning:
    """What SD3's text side gives the transformer: `hidden` (B, 77 + L, joint_attention_dim), its
    `encoder_hidden_states` (both CLIPs' tokens side by side, zero-padded, then T5's tokens or zeros); `pooled`
    (B, p_l + p_g) its `pooled_projections`; `widths` (w_l, w_g) and `pooled_widths` (p_l, p_g), the encoders'
    own outputs' widths, to pick one back out (`SD3Family.text_output`)."""

    hidden: torch.Tensor
    pooled: torch.Tensor
    widths: tuple
    pooled_widths: tuple

    def rows(self, index) -> "SD3Conditioning":
        return SD3Conditioning(self.hidden[index], self.pooled[index], self.widths, self.pooled_widths)

    def to(self, device) -> "SD3Conditioning":
        """The same conditioning on `device` (an offloaded encoder's output moved to the training device)."""
        return SD3Conditioning(self.hidden.to(device), self.pooled.to(device), self.widths, self.pooled_widths)

    def row(self, i: int) -> "SD3Conditioning":
        """Caption i's conditioning, copied (a cache entry must not keep the whole batch alive)."""
        return SD3Conditioning(self.hidden[i].clone(), self.pooled[i].clone(), self.widths, self.pooled_widths)

    @staticmethod
    def stack(rows: list["SD3Conditioning"]) -> "SD3Conditioning":
        """The batch of single captions' conditionings (`row`), in order."""
        return SD3Conditioning(torch.stack([r.hidden for r in rows]), torch.stack([r.pooled for r in rows]),
                               rows[0].widths, rows[0].pooled_widths)


def _pipeline_clip_skip(clip_skip: int) -> int | None:
    """sdlora's clip_skip (1: the penultimate layer, as SDXL's) as the pipeline's (None: the penultimate layer; k:
    `hidden_states[-(k + 2)]`)."""
    return None if clip_skip == 1 else clip_skip - 1


@dataclass(frozen=True)
class SD3Family(ModelFamily):
    """SD3 / SD3.5 (see the module docstring). `model_type` is kohya's (mmdit_keys.kohya_model_type): `medium`,
    `5-medium` or `5-large`; it picks the instance a transformer config belongs to. `for_run` gives the instance a
    run uses, with the transformer's `joint_attention_dim` and text_encoder.t5_max_length."""

    model_type: str = "medium"
    t5_max_length: int = 256
    joint_attention_dim: int | None = None  # None: T5's width (the transformer reads T5's tokens as they are)

    # -- names, metadata and config ---------------------------------------------------------------------------
    def kohya_base_fields(self, prediction_type: str) -> dict[str, str]:
        return {"ss_base_model_version": self.kohya_version, "ss_v2": "False", "ss_v_parameterization": "False"}

    def check_config(self, cfg) -> None:
        """Refuse, in one line, the DDPM-only options (they have no meaning for rectified flow) and CLIP chunking
        (the SD3 pipeline reads one 77-token window per CLIP)."""
        ddpm = ddpm_keys_set(cfg.loss)
        ddpm += [k for k, given in (("model.prediction_type", cfg.model.prediction_type is not None),
                                    ("model.zero_terminal_snr", bool(cfg.model.zero_terminal_snr))) if given]
        if ddpm:
            raise UserError(f"{ddpm[0]}: a DDPM option (SD 1.x, 2.x, SDXL), and {self.title} trains with rectified "
                            "flow; use loss.flow.* (timestep_sampling, logit_mean, logit_std, mode_scale, shift, "
                            "target, weighting, min_sigma, max_sigma)")
        if cfg.data.max_token_length != 75:
            raise UserError(f"data.max_token_length: {cfg.data.max_token_length}; {self.title}'s pipeline reads one "
                            "77-token window per CLIP (allowed: 75; T5's length is text_encoder.t5_max_length)")
        self.check_train_parts(cfg)

    def for_run(self, comps, cfg) -> "SD3Family":
        """This family with the model's `joint_attention_dim` and text_encoder.t5_max_length; T5's tokenizer then
        pads and truncates to that length (the pipeline's max_sequence_length), so every `model.text.tokenize`
        call gives the ids the pipeline gives."""
        depth = _model(comps.denoiser).config.num_layers
        slg = getattr(getattr(cfg, "sample", None), "skip_layer_guidance", None)  # a run record's settings have none
        if slg is not None and max(slg.layers) >= depth:
            raise UserError(f"sample.skip_layer_guidance.layers: {slg.layers}; this transformer has joint blocks "
                            f"0 to {depth - 1}")
        t5 = comps.tokenizers_by_part.get("text_encoder_3")
        if t5 is not None:
            t5.model_max_length = cfg.text_encoder.t5_max_length
        return replace(self, t5_max_length=cfg.text_encoder.t5_max_length,
                       joint_attention_dim=_model(comps.denoiser).config.joint_attention_dim)

    def bundled_configs(self, prediction_type: str = "epsilon"):
        """The released model's diffusers configs for its single files (transformer, VAE, CLIP-L, CLIP-G, T5,
        scheduler, the CLIP tokenizers' settings; no T5 tokenizer)."""
        from sdlora.model.family_base import RESOURCES

        return RESOURCES / "configs" / BUNDLED_FOLDERS[self.model_type]

    # -- conditioning -----------------------------------------------------------------------------------------
    def encode(self, text_encoders, input_ids, clip_skip: int = 1) -> SD3Conditioning:
        """`text_encoders` / `input_ids`: CLIP-L's, CLIP-G's and (when the model has it) T5's, in that order; the
        transformer's inputs as `StableDiffusion3Pipeline.encode_prompt` builds them (sd3_text.join_sd3)."""
        from sdlora.model.sd3_text import clip_outputs, join_sd3, t5_absent, t5_output

        encoders, ids = list(text_encoders), list(input_ids)
        skip = _pipeline_clip_skip(clip_skip)
        hidden_l, pooled_l = clip_outputs(encoders[0], ids[0], skip)
        hidden_g, pooled_g = clip_outputs(encoders[1], ids[1], skip)
        dtype = _dtype(encoders[0])
        if len(encoders) > 2:
            t5 = t5_output(_model(encoders[2]), ids[2])
        elif self.joint_attention_dim is None:
            raise ValueError("SD3 without T5: the family needs the transformer's joint_attention_dim (for_run)")
        else:
            t5 = t5_absent(hidden_l.shape[0], self.t5_max_length, self.joint_attention_dim, dtype, hidden_l.device)
        hidden, pooled = join_sd3(hidden_l, hidden_g, t5, pooled_l, pooled_g, dtype=dtype)
        return SD3Conditioning(hidden, pooled, (hidden_l.shape[-1], hidden_g.shape[-1]),
                               (pooled_l.shape[-1], pooled_g.shape[-1]))

    def text_output(self, name: str, embeddings: SD3Conditioning) -> torch.Tensor:
        """One encoder's own output out of the conditioning: a CLIP's tokens (B, 77, width), T5's (B, L, width),
        or one CLIP's half of the pooled vector, `pooled_l` (B, 1, p_l) or `pooled` (CLIP-G's, B, 1, p_g)."""
        if name in ("pooled_l", "pooled"):  # CLIP-L's and CLIP-G's halves of the pooled vector
            p_l = embeddings.pooled_widths[0]
            return embeddings.pooled[:, None, :p_l] if name == "pooled_l" else embeddings.pooled[:, None, p_l:]
        if name == "text_encoder_3":
            return embeddings.hidden[:, CLIP_TOKENS:]
        w_l, w_g = embeddings.widths
        clip = embeddings.hidden[:, :CLIP_TOKENS]
        return clip[..., :w_l] if name == "text_encoder" else clip[..., w_l:w_l + w_g]

    def encode_text_output(self, name: str, text_encoder, input_ids, clip_skip: int = 1) -> torch.Tensor:
        from sdlora.model.sd3_text import clip_outputs, t5_output

        if name == "text_encoder_3":
            return t5_output(_model(text_encoder), input_ids)
        hidden, pooled = clip_outputs(text_encoder, input_ids, _pipeline_clip_skip(clip_skip))
        return pooled[:, None, :] if name.startswith("pooled") else hidden

    def pipeline_embeddings(self, cond: SD3Conditioning, uncond: SD3Conditioning, dtype, *,
                            empty_negative: bool = False) -> dict:
        """The pipeline's embeddings; the negative prompt, empty or not, is encoded like any prompt (the pipeline's
        own unconditional input is the encoded "")."""
        return {"prompt_embeds": cond.hidden.to(dtype), "negative_prompt_embeds": uncond.hidden.to(dtype),
                "pooled_prompt_embeds": cond.pooled.to(dtype), "negative_pooled_prompt_embeds": uncond.pooled.to(dtype)}

    # -- the denoiser call and the noise process ------------------------------------------------------------
    def latent_multiple(self, denoiser) -> int:
        """`SD3Transformer2DModel` cuts the latent into patch_size² patches: an odd side loses its last row."""
        return int(denoiser.config.patch_size)

    def predict(self, denoiser, noisy, timesteps, conditioning: SD3Conditioning, batch: dict | None = None):
        """`SD3Transformer2DModel` with keyword arguments (its second positional argument is not the timestep):
        `timestep` is the objective's `Noised.timesteps` (sigma · 1000)."""
        return denoiser(hidden_states=noisy, encoder_hidden_states=conditioning.hidden,
                        pooled_projections=conditioning.pooled, timestep=timesteps).sample

    def objective(self, noise_scheduler, vae_config, loss_cfg):
        """Rectified flow (model/flow_objective.py) with loss.flow's draws, target and weighting; the shift
        defaults to the scheduler config's."""
        from sdlora.model import flow_matching as fm
        from sdlora.model.flow_objective import FlowMatchingObjective

        f = loss_cfg.flow
        draw = fm.SigmaDraw(f.timestep_sampling, f.logit_mean, f.logit_std, f.mode_scale, f.shift,
                            (f.min_sigma, f.max_sigma))
        return FlowMatchingObjective.from_configs(noise_scheduler.config, vae_config, draw, f.target, f.weighting)

    # -- pipelines --------------------------------------------------------------------------------------------
    def pipeline(self, *, denoiser, vae, text_encoders: dict, tokenizers: list, scheduler):
        """`StableDiffusion3Pipeline` around these models; without T5, `text_encoder_3=None, tokenizer_3=None`."""
        import diffusers

        parts = {}
        for part, tokenizer in zip(self.text_encoder_parts, list(tokenizers) + [None] * 3):
            parts[part.name] = text_encoders.get(part.name)
            parts[part.tokenizer] = tokenizer if part.name in text_encoders else None
        return getattr(diffusers, self.pipeline_class)(transformer=denoiser, vae=vae, scheduler=scheduler, **parts)

    # -- recognition --------------------------------------------------------------------------------------
    def matches_denoiser(self, config) -> bool:
        from sdlora.model.mmdit_keys import kohya_model_type

        return "caption_projection_dim" in config and kohya_model_type(config) == self.model_type

    def matches_single_file(self, keys) -> bool:
        """An SD3 single file of this variant: MMDiT keys under `model.diffusion_model.` whose QK-norm and dual
        attention give this model type (model/sd3_single_file.mmdit_structure)."""
        from sdlora.model.mmdit_keys import kohya_model_type
        from sdlora.model.sd3_single_file import is_sd3_file, mmdit_structure

        return is_sd3_file(keys) and kohya_model_type(mmdit_structure(keys)) == self.model_type

    def claims_folder(self, index: dict, denoiser_config: dict) -> bool:
        return self.matches_denoiser(denoiser_config)

    def check_folder(self, path, index: dict, denoiser_config: dict) -> None:
        for part in ("text_encoder", "text_encoder_2"):
            if index.get(part) in (None, [None, None]):
                raise UserError(f"model.path: {path} is an {self.title} model without {part} (CLIP-L and CLIP-G are "
                                "both needed; only T5, text_encoder_3, may be absent)")


def _model(module):
    """The module under a data-parallel wrapper."""
    return getattr(module, "module", module)


def _dtype(module) -> torch.dtype:
    return next(_model(module).parameters()).dtype
