"""Non-finite guard: a step whose loss or gradients are NaN/inf makes no optimiser update; too many in a row stop
the run; an update that makes the weights themselves non-finite stops it at once; nothing non-finite is written.

Deciding whether to skip needs the verdict on the host. The check is folded into the step so it costs exactly one
device-to-host sync per optimiser step: the finiteness of every micro-batch's loss is accumulated on the device
(`torch.isfinite`, no sync), and-ed with the finiteness of the gradients (the clipped total norm, or their max
magnitude) and of the weights after the previous update, reduced across processes together with the stop-signal
flag, and read once.
"""

from __future__ import annotations

import torch

from sdlora.errors import UserError


class NonFiniteLoss(UserError):
    """Too many consecutive non-finite losses; the last good state was saved before this is raised."""

    exit_code = 3


class StepVerdict:
    """What all processes agreed on for one optimiser step."""

    __slots__ = ("loss_finite", "grads_finite", "weights_finite", "stop_signal")

    def __init__(self, stop_signal: int | None, loss_finite: bool = True, grads_finite: bool = True,
                 weights_finite: bool = True):
        self.stop_signal = stop_signal
        self.loss_finite, self.grads_finite, self.weights_finite = loss_finite, grads_finite, weights_finite

    @property
    def finite(self) -> bool:
        """The step may update: its loss and gradients are finite."""
        return self.loss_finite and self.grads_finite

    @property
    def reason(self) -> str:
        return "non-finite loss" if not self.loss_finite else "non-finite gradients"


def agree(accelerator, stop_signal: int | None, *, loss_finite: torch.Tensor, grads_finite: torch.Tensor | None = None,
          weights_finite: torch.Tensor | None = None) -> StepVerdict:
    """The one host sync per step: [non-finite loss, gradients, weights, signal number] maxed over processes, read.
    `weights_finite` is about the weights after the previous update."""
    ok = [loss_finite] + [t if t is not None else torch.ones_like(loss_finite) for t in (grads_finite, weights_finite)]
    flags = torch.stack([(~t.to(loss_finite.device)).float() for t in ok]
                        + [torch.tensor(float(stop_signal or 0), device=loss_finite.device)])
    if accelerator.num_processes > 1:
        flags = accelerator.gather(flags[None]).amax(0)
    bad_loss, bad_grads, bad_weights, signum = flags.tolist()
    return StepVerdict(int(signum) or None, loss_finite=bad_loss == 0, grads_finite=bad_grads == 0,
                       weights_finite=bad_weights == 0)


def all_finite(tensors) -> torch.Tensor:
    """A device bool, no host sync: every element of every tensor is finite. The max magnitude (inf-norm) cannot
    overflow on finite values and is NaN/inf as soon as one element is."""
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return torch.ones((), dtype=torch.bool)  # a 0-dim CPU bool combines with a device bool
    return torch.isfinite(torch.nn.utils.get_total_norm(tensors, norm_type=float("inf")))


def grads_finite(params, clipped_total_norm: torch.Tensor | None = None) -> torch.Tensor:
    """A device bool: the gradients are finite. With clipping on, its total norm already says so (a total norm
    that overflows on huge finite gradients also counts as non-finite: such a step is not worth taking)."""
    if clipped_total_norm is not None:
        return torch.isfinite(clipped_total_norm)
    return all_finite([p.grad for p in params])


class NonFiniteCounter:
    def __init__(self, max_consecutive: int, total: int = 0, consecutive: int = 0):
        self.max_consecutive = max_consecutive
        self.total, self.consecutive = total, consecutive

    def record(self, finite: bool) -> None:
        if finite:
            self.consecutive = 0
        else:
            self.total += 1
            self.consecutive += 1

    @property
    def exhausted(self) -> bool:
        return self.consecutive >= self.max_consecutive

    def state_dict(self) -> dict:
        return {"nonfinite_total": self.total, "nonfinite_consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.total = int(state.get("nonfinite_total", 0))
        self.consecutive = int(state.get("nonfinite_consecutive", 0))
