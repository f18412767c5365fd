"""The random draws of a training step (latent sampling, noise, timesteps), independent of the process count.

Both classes answer the `Draws` questions of model/objective.py (`normal`, `uniform`, `integers`, `batch_uniform`), so the objective
asks for what it needs without knowing whose generator it is.
"""

from __future__ import annotations

import torch


class GlobalBatchDraws:
    """Noise, latent-sampling eps and timesteps drawn for the whole global batch, then this process's slice.

    Every process draws the same numbers from the same generator, so process r's samples get exactly the
    draws they would get in a one-process run with batch_size x num_processes: the result does not depend
    on the process count. Drawn on `local`'s device; tensors of a shape in its dtype, per-example values in float32.
    """

    def __init__(self, generator: torch.Generator, local: torch.Tensor, batch_size: int, accelerator):
        self.gen, self.like = generator, local
        self.start = accelerator.process_index * batch_size
        self.n, self.total = local.shape[0], batch_size * accelerator.num_processes
        self.total = max(self.total, self.start + self.n)

    def _mine(self, t: torch.Tensor) -> torch.Tensor:
        return t[self.start:self.start + self.n]

    def randn(self) -> torch.Tensor:
        """A standard normal shaped like `local` (sampling the VAE's latent distribution)."""
        return self.normal(tuple(self.like.shape[1:]))

    def normal(self, shape: tuple) -> torch.Tensor:
        """(n, *shape) standard normals: in `local`'s dtype, float32 for one value per example (shape ())."""
        t = self.like
        dtype = t.dtype if len(shape) else torch.float32  # a per-example noise level keeps its bits under bf16
        return self._mine(torch.randn((self.total, *shape), generator=self.gen, device=t.device, dtype=dtype))

    def uniform(self) -> torch.Tensor:
        """(n,) uniforms in [0, 1), float32."""
        return self._mine(torch.rand((self.total,), generator=self.gen, device=self.like.device, dtype=torch.float32))

    def integers(self, low: int, high: int) -> torch.Tensor:
        return self._mine(torch.randint(low, high, (self.total,), generator=self.gen, device=self.like.device))

    def batch_uniform(self) -> float:
        """One uniform in [0, 1) for the whole global batch (every process draws the same)."""
        return float(torch.rand((), generator=self.gen, device=self.like.device, dtype=torch.float32))


class GeneratorDraws:
    """`count` examples' draws from a CPU generator (float32), moved to `device` (the row Fisher estimate: the same
    numbers on every device)."""

    def __init__(self, generator: torch.Generator, count: int, device):
        self.gen, self.n, self.device = generator, count, device

    def normal(self, shape: tuple) -> torch.Tensor:
        return torch.randn((self.n, *shape), generator=self.gen).to(self.device)

    def uniform(self) -> torch.Tensor:
        return torch.rand((self.n,), generator=self.gen).to(self.device)

    def integers(self, low: int, high: int) -> torch.Tensor:
        return torch.randint(low, high, (self.n,), generator=self.gen).to(self.device)

    def batch_uniform(self) -> float:
        return float(torch.rand((), generator=self.gen))
