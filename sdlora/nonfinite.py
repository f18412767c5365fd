"""Non-finite loss guard: a step whose loss is NaN/inf makes no optimiser update; too many in a row stop the run.

Deciding whether to skip needs the loss on the host. The check is folded into the step so it costs exactly one
device-to-host sync per optimiser step: the finiteness of every micro-batch's loss is accumulated on the device
(`torch.isfinite`, no sync), reduced across processes together with the stop-signal flag, and read once.
"""

from __future__ import annotations

import torch

from .errors import UserError


class NonFiniteLoss(UserError):
    """Too many consecutive non-finite losses; the last good state was saved before this is raised."""

    exit_code = 3


class StepVerdict:
    """What all processes agreed on for one optimiser step."""

    __slots__ = ("finite", "stop_signal")

    def __init__(self, finite: bool, stop_signal: int | None):
        self.finite, self.stop_signal = finite, stop_signal


def agree(accelerator, finite: torch.Tensor, stop_signal: int | None) -> StepVerdict:
    """The one host sync per step: [non-finite, signal number] maxed over processes, then read."""
    flags = torch.stack([(~finite).float(), torch.tensor(float(stop_signal or 0), device=finite.device)])
    if accelerator.num_processes > 1:
        flags = accelerator.gather(flags[None]).amax(0)
    nonfinite, signum = flags.tolist()
    return StepVerdict(finite=nonfinite == 0, stop_signal=int(signum) or None)


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
