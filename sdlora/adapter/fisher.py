"""An adapter's row-wise diagonal Fisher: what it is, and how it is stored in the adapter file's metadata.

For each adapted module with weight W (out x in, or out x in x kh x kw) the row Fisher is

    F[j] = E[ Σ_k (∂L/∂W[j, k])² ]     (out,): one value per output feature j

the diagonal Fisher information summed over the row's inputs, as FWSVD uses it (Hsu et al., ICLR 2022,
"Language model compression with weighted low-rank factorization", section 3: the row-wise sum of the empirical
Fisher). L is the diffusion loss, W the adapted weight W0 + ΔW, the expectation an average over single examples
with random timesteps and noise (`sdlora.training.fisher` estimates it). A per-element diagonal for SD 1.5 would be
as large as the model; the row form is a few hundred thousand numbers (about 1.5 MB of header).

Stored under the metadata key `sdlora.fisher` as JSON: {"samples": N, "data": what it was measured on,
"modules": {canonical name: base64 of the (out,) float32 values, little-endian}}. Metadata is the one place both
layouts carry (a kohya file keeps `sdlora.*` keys) that no loader reads as weights: an extra tensor would make
diffusers' and A1111's loaders refuse the file.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field

import numpy as np
import torch

from sdlora.errors import UserError

METADATA_KEY = "sdlora.fisher"


@dataclass
class RowFisher:
    """modules: canonical name -> (out,) float32, every value finite and >= 0 (units: squared loss per squared
    weight unit, as the gradients give them). samples: examples averaged; data: what they were."""

    modules: dict[str, torch.Tensor]
    samples: int = 0
    data: str = ""
    extra: dict = field(default_factory=dict)

    def to_metadata(self) -> dict[str, str]:
        enc = {n: base64.b64encode(f.detach().cpu().float().numpy().astype("<f4").tobytes()).decode("ascii")
               for n, f in sorted(self.modules.items())}
        return {METADATA_KEY: json.dumps({"samples": self.samples, "data": self.data, **self.extra, "modules": enc},
                                         sort_keys=True)}

    @classmethod
    def from_metadata(cls, meta: dict[str, str], where: str = "the adapter") -> "RowFisher | None":
        """The Fisher stored in a file's metadata; None when there is none; a UserError naming `where` when it is
        malformed (not JSON, a value negative or not finite)."""
        if METADATA_KEY not in meta:
            return None
        try:
            raw = json.loads(meta[METADATA_KEY])
            modules = {n: torch.from_numpy(np.frombuffer(base64.b64decode(v, validate=True), dtype="<f4").copy())
                       for n, v in raw.pop("modules").items()}
            samples, data = int(raw.pop("samples", 0)), str(raw.pop("data", ""))
        except (ValueError, TypeError, KeyError, AttributeError):
            raise UserError(f"{where}: metadata {METADATA_KEY} is not a stored row Fisher (remove it or recompute "
                            "with --fisher-data)") from None
        for n, f in modules.items():
            if not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
                raise UserError(f"{where}: stored Fisher of module {n} has negative or non-finite values")
        return cls(modules, samples, data, raw)

    def check_covers(self, adapter, where: str) -> None:
        """A UserError unless every module of `adapter` has a Fisher of one value per output feature."""
        for name, m in adapter.modules.items():
            f = self.modules.get(name)
            if f is None:
                raise UserError(f"{where}: the stored Fisher has no module {name} (recompute with --fisher-data)")
            if f.numel() != m.weight_shape[0]:
                raise UserError(f"{where}: the stored Fisher of {name} has {f.numel()} values for "
                                f"{m.weight_shape[0]} output features (a different adapter?)")


def with_fisher(meta: dict[str, str], fisher: RowFisher) -> dict[str, str]:
    """The metadata with `fisher` stored (replacing any older one)."""
    return {**meta, **fisher.to_metadata()}
