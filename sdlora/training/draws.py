"""The random draws of a training step (latent sampling, noise, timesteps), independent of the process count."""

from __future__ import annotations

import torch

from sdlora.training.losses import sample_noise


class GlobalBatchDraws:
    """Noise, latent-sampling eps and timesteps drawn for the whole global batch, then this process's slice.

    Every process draws the same numbers from the same generator, so process r's samples get exactly the
    draws they would get in a one-process run with batch_size x num_processes: the result does not depend
    on the process count.
    """

    def __init__(self, generator: torch.Generator, local: torch.Tensor, batch_size: int, accelerator):
        self.gen, self.like = generator, local
        self.start = accelerator.process_index * batch_size
        self.n, self.total = local.shape[0], batch_size * accelerator.num_processes
        self.total = max(self.total, self.start + self.n)

    def _mine(self, t: torch.Tensor) -> torch.Tensor:
        return t[self.start:self.start + self.n]

    def randn(self) -> torch.Tensor:
        t = self.like
        return self._mine(torch.randn((self.total, *t.shape[1:]), generator=self.gen, device=t.device, dtype=t.dtype))

    def noise(self, noise_offset: float) -> torch.Tensor:
        t = self.like
        return self._mine(sample_noise(t.new_empty((self.total, *t.shape[1:])), noise_offset, self.gen))

    def timesteps(self, low: int, high: int) -> torch.Tensor:
        return self._mine(torch.randint(low, high, (self.total,), generator=self.gen, device=self.like.device))
