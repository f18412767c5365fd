"""The embedding-norm penalty: keep the text encoder's output token norms where the untrained encoder had them.

    penalty = weight · mean_t | ‖E(c)_t‖ − ‖E0(c)_t‖ |

E is the conditioning the UNet receives (after clip-skip and the final layer norm), E0 the same with
the adapters disabled. E0 depends only on the token ids, so its per-token norms are cached per distinct
token sequence (LRU, bounded): on a hit the penalty costs no extra text-encoder pass.

A family with several text outputs (SDXL: each encoder's tokens, and the pooled embedding as a one-token
output) holds each to its own base norms, with its own cache and weight: `TextRegulariser`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch

from sdlora.lora.layers import adapters_disabled
from sdlora.model.text import content_mask, encode, tokenize
from sdlora.util.lru import CaptionLRU


def token_norms(embeddings: torch.Tensor, norm: str = "l2") -> torch.Tensor:
    """(B, T, D) -> (B, T) vector norm of each token embedding, in fp32."""
    return torch.linalg.vector_norm(embeddings.float(), ord=2 if norm == "l2" else 1, dim=-1)


@torch.no_grad()
def base_embeddings(text_encoder, input_ids: torch.Tensor, clip_skip: int, encode_fn=encode) -> torch.Tensor:
    """E0: the text encoder's output (`encode_fn(text_encoder, ids, clip_skip)`) with every adapter disabled
    (W0, whatever the init scheme)."""
    with adapters_disabled(text_encoder):
        return encode_fn(text_encoder, input_ids, clip_skip).float()


class BaseNormCache:
    """‖E0_t‖ per distinct token sequence (or, with `keep_embeddings`, E0 itself, for the direction term), in the
    shared least-recently-used cache (util/lru.py): a caption repeated in a batch is encoded once."""

    def __init__(self, text_encoder, clip_skip: int, norm: str, capacity: int, keep_embeddings: bool = False,
                 encode_fn=encode):
        self.text_encoder, self.clip_skip, self.norm = text_encoder, clip_skip, norm
        self.keep_embeddings, self.encode_fn = keep_embeddings, encode_fn
        self.lru = CaptionLRU(capacity)

    @property
    def hits(self) -> int:
        return self.lru.hits

    @property
    def misses(self) -> int:
        return self.lru.misses

    @property
    def entries(self):
        return self.lru.entries

    def _compute(self, input_ids: torch.Tensor) -> torch.Tensor:
        fresh = base_embeddings(self.text_encoder, input_ids, self.clip_skip, self.encode_fn)
        return fresh if self.keep_embeddings else token_norms(fresh, self.norm)

    def norms(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.lru.rows(input_ids, self._compute)).to(input_ids.device)


@dataclass
class PenaltyResult:
    penalty: torch.Tensor  # unweighted, differentiable
    mean_norm: torch.Tensor
    mean_base_norm: torch.Tensor
    relative_drift: torch.Tensor
    direction: torch.Tensor | None = None  # unweighted 1 - cos term, when direction_weight > 0

    def scalars(self, prefix: str = "embedding_norm/") -> dict[str, torch.Tensor]:
        """The logged values (detached, on the device)."""
        out = {"penalty": self.penalty, "mean_norm": self.mean_norm, "mean_base_norm": self.mean_base_norm,
               "relative_drift": self.relative_drift}
        if self.direction is not None:
            out["direction"] = self.direction
        return {prefix + k: v.detach() for k, v in out.items()}


def direction_penalty(embeddings: torch.Tensor, base: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean over captions of mean_t (1 − cos(E_t, E0_t)) over masked positions: holds the direction, not the norm."""
    cos = torch.nn.functional.cosine_similarity(embeddings.float(), base.float(), dim=-1)
    m = mask.to(cos.dtype)
    return (((1.0 - cos) * m).sum(1) / m.sum(1).clamp_min(1.0)).mean()


def embedding_norm_penalty(embeddings: torch.Tensor, base_norms: torch.Tensor, mask: torch.Tensor, *, norm: str = "l2",
                           reduce: str = "per_token") -> PenaltyResult:
    """Unweighted L1 distance between token norms and the base norms over masked positions, averaged per caption."""
    n = token_norms(embeddings, norm)
    m = mask.to(n.dtype)
    count = m.sum(1).clamp_min(1.0)
    if reduce == "per_token":
        per_caption = ((n - base_norms).abs() * m).sum(1) / count
    else:
        per_caption = ((n * m).sum(1) / count - (base_norms * m).sum(1) / count).abs()
    with torch.no_grad():
        rel = ((n - base_norms).abs() / base_norms.clamp_min(1e-8) * m).sum() / m.sum().clamp_min(1.0)
        mean_n = (n * m).sum() / m.sum().clamp_min(1.0)
        mean_b = (base_norms * m).sum() / m.sum().clamp_min(1.0)
    return PenaltyResult(per_caption.mean(), mean_n, mean_b, rel)


class EmbeddingNormRegulariser:
    """What the training loop calls: `penalty(input_ids, embeddings) -> PenaltyResult`, E0 norms cached."""

    def __init__(self, text_encoder, tokenizer, cfg, *, family, output: str):
        """`family` and `output`: which of the family's `text_outputs` this holds (SD 1.x/2.x: `text_encoder`)."""
        self.cfg = cfg.reg.embedding_norm
        self.eos_token_id, self.window = tokenizer.eos_token_id, tokenizer.model_max_length
        self.text_encoder, self.clip_skip = text_encoder, cfg.text_encoder.clip_skip
        self.encode_fn = partial(_encode_output, family, output)
        self.per_token = dict((n, t) for n, _, t in family.text_outputs)[output]
        self.direction = self.cfg.direction_weight > 0
        self.cache = BaseNormCache(text_encoder, cfg.text_encoder.clip_skip, self.cfg.norm, self.cfg.cache_size,
                                   keep_embeddings=self.direction, encode_fn=self.encode_fn)
        self.pinned_ids = None
        if self.direction and self.cfg.direction_prompts in ("pinned", "both"):
            self.pinned_ids = tokenize(tokenizer, list(self.cfg.pinned_prompts), cfg.data.max_token_length)

    def mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.per_token:  # a pooled embedding: one vector per caption
            return torch.ones(input_ids.shape[0], 1, dtype=torch.bool, device=input_ids.device)
        if self.cfg.tokens == "content":
            return content_mask(input_ids, self.eos_token_id, self.window)  # per 77-token chunk for long captions
        return torch.ones_like(input_ids, dtype=torch.bool)

    def __call__(self, input_ids: torch.Tensor, embeddings: torch.Tensor) -> PenaltyResult:
        if isinstance(input_ids, (list, tuple)):  # the loop's one-per-text-encoder list (one encoder here)
            (input_ids,) = input_ids
        base = self.cache.norms(input_ids)
        mask = self.mask(input_ids)
        base_norms = token_norms(base, self.cfg.norm) if self.direction else base
        result = embedding_norm_penalty(embeddings, base_norms, mask, norm=self.cfg.norm, reduce=self.cfg.reduce)
        if self.direction:
            terms = []
            if self.cfg.direction_prompts in ("batch", "both"):
                terms.append(direction_penalty(embeddings, base, mask))
            if self.pinned_ids is not None:  # one more text-encoder pass per step, with gradients
                ids = self.pinned_ids.to(input_ids.device)
                live = self.encode_fn(self.text_encoder, ids, self.clip_skip)
                terms.append(direction_penalty(live, self.cache.norms(ids), self.mask(ids)))
            result.direction = sum(terms) / len(terms)
        return result


def _encode_output(family, output, text_encoder, input_ids, clip_skip):
    return family.encode_text_output(output, text_encoder, input_ids, clip_skip)


@dataclass
class TextPenalty:
    """Each held text output's PenaltyResult (`text_encoder`; SDXL also `text_encoder_2` and `pooled`)."""

    terms: dict = field(default_factory=dict)


class TextRegulariser:
    """What the training loop calls, for any family: each of the family's text outputs with a weight (or the
    direction term) on is held by its own `EmbeddingNormRegulariser`, with its own cache of base norms.

    Logged names: `embedding_norm/<value>` for the first text encoder (SD 1.x/2.x's one), and
    `embedding_norm/<output>/<value>` for the others (SDXL: `text_encoder_2`, `pooled`)."""

    def __init__(self, family, text_encoders: dict, tokenizers: dict, cfg):
        self.cfg = cfg.reg.embedding_norm
        self.cfg.check_outputs(family)
        components = list(text_encoders)  # the order of the loop's token ids (one per text encoder)
        self.parts = {}  # output -> (regulariser, index of its encoder's ids, weight)
        for output, component, _ in family.text_outputs:
            weight = self.cfg.weight_of(output, family)
            if weight == 0 and self.cfg.direction_weight == 0:
                continue  # this output not held: no extra pass, nothing cached
            reg = EmbeddingNormRegulariser(text_encoders[component], tokenizers[component], cfg, family=family,
                                           output=output)
            self.parts[output] = (reg, components.index(component), weight)
        self.family = family

    def __call__(self, input_ids: list, embeddings) -> TextPenalty:
        return TextPenalty({output: reg(input_ids[index], self.family.text_output(output, embeddings))
                            for output, (reg, index, _) in self.parts.items()})

    def add_to(self, loss: torch.Tensor, result: TextPenalty) -> torch.Tensor:
        """loss + Σ weight · penalty (+ direction_weight · direction), output by output."""
        for output, term in result.terms.items():
            loss = loss + self.parts[output][2] * term.penalty
            if term.direction is not None:
                loss = loss + self.cfg.direction_weight * term.direction
        return loss

    def scalars(self, result: TextPenalty) -> dict[str, torch.Tensor]:
        out = {}
        for output, term in result.terms.items():
            out.update(term.scalars(_prefix(output, self.family)))
        return out

    def cache_hits(self) -> dict[str, int]:
        return {_prefix(output, self.family) + "cache_hits": reg.cache.hits for output, (reg, _, _) in self.parts.items()}


def _prefix(output: str, family) -> str:
    """The family's first text output logs as `embedding_norm/<value>`, the others as `embedding_norm/<output>/...`."""
    return "embedding_norm/" if output == family.text_outputs[0][0] else f"embedding_norm/{output}/"
