"""The drift probe: how far the text encoder's embeddings of everyday prompts moved from the base model's.

It measures de-generalisation whether or not the embedding-norm penalty is on: mean relative token-norm
drift |‖E‖−‖E0‖| / ‖E0‖ and mean cosine similarity between E and E0, over content tokens (up to and
including the end-of-text token) of prompts unrelated to typical training subjects.

A family with several text outputs (SDXL) gets one probe per output (`family_probe`): `probe/<value>` for the
first text encoder, `probe/<output>/<value>` for the others (`text_encoder_2`, `pooled`).
"""

from __future__ import annotations

from functools import partial

import torch

from sdlora.model.text import content_mask, tokenize
from sdlora.reg.embedding_norm import _encode_output, base_embeddings, token_norms

DEFAULT_PROBE_PROMPTS = [
    "a bowl of fruit on a kitchen table",
    "a red car parked on a city street",
    "a mountain lake at sunrise",
    "an old wooden bridge over a river",
    "a cup of coffee next to a laptop",
    "a dog running on the beach",
    "a bicycle leaning against a brick wall",
    "a vase of flowers by the window",
    "a snowy forest in winter",
    "a plate of pasta with tomato sauce",
    "a lighthouse on a rocky coast",
    "children playing football in a park",
]


class DriftProbe:
    def __init__(self, text_encoder, tokenizer, prompts: list[str] | None = None, clip_skip: int = 1,
                 max_token_length: int | None = None, *, family, output: str):
        """`family` and `output`: which of the family's `text_outputs` this measures (SD 1.x/2.x: `text_encoder`)."""
        self.text_encoder, self.clip_skip = text_encoder, clip_skip
        self.encode_fn = partial(_encode_output, family, output)
        self.prefix = "probe/" if output == family.text_outputs[0][0] else f"probe/{output}/"
        self.prompts = list(prompts or DEFAULT_PROBE_PROMPTS)
        self.input_ids = tokenize(tokenizer, self.prompts, max_token_length)  # chunked like the training captions
        per_token = dict((n, t) for n, _, t in family.text_outputs)[output]
        self.mask = (content_mask(self.input_ids, tokenizer.eos_token_id, tokenizer.model_max_length) if per_token
                     else torch.ones(len(self.prompts), 1, dtype=torch.bool))  # pooled: one vector per prompt
        self._base: torch.Tensor | None = None

    def _device(self):
        return next(self.text_encoder.parameters()).device

    @torch.no_grad()
    def measure(self) -> dict[str, float]:
        ids = self.input_ids.to(self._device())
        if self._base is None:  # the base embeddings never change: computed once
            self._base = base_embeddings(self.text_encoder, ids, self.clip_skip, self.encode_fn)
        was_training = self.text_encoder.training
        self.text_encoder.eval()
        try:
            e = self.encode_fn(self.text_encoder, ids, self.clip_skip).float()
        finally:
            self.text_encoder.train(was_training)
        stats = drift_stats(e, self._base, self.mask.to(e.device))
        return {self.prefix + k.removeprefix("probe/"): v for k, v in stats.items()}


class DriftProbes:
    """One DriftProbe per text output of the family; `measure` gives all their values in one dict."""

    def __init__(self, probes: list[DriftProbe]):
        self.probes = probes

    def measure(self) -> dict[str, float]:
        return {k: v for probe in self.probes for k, v in probe.measure().items()}


def family_probe(family, text_encoders: dict, tokenizers: dict, prompts=None, clip_skip: int = 1,
                 max_token_length: int | None = None):
    """The drift probe of every text output of `family` whose encoder is in `text_encoders` (a plain DriftProbe
    where that is one output)."""
    probes = [DriftProbe(text_encoders[component], tokenizers[component], prompts, clip_skip, max_token_length,
                         family=family, output=output)
              for output, component, _ in family.text_outputs if component in text_encoders]
    return probes[0] if len(probes) == 1 else DriftProbes(probes)


def drift_stats(e: torch.Tensor, e0: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    n, n0 = token_norms(e), token_norms(e0)
    m = mask.float()
    total = m.sum()
    rel = ((n - n0).abs() / n0.clamp_min(1e-8) * m).sum() / total
    cos = (torch.nn.functional.cosine_similarity(e, e0, dim=-1) * m).sum() / total
    return {"probe/drift": float(rel), "probe/cosine": float(cos), "probe/norm": float((n * m).sum() / total),
            "probe/base_norm": float((n0 * m).sum() / total)}
