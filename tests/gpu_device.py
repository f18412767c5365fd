"""The device the `gpu`-marked tests train on, and a record of where every training run of theirs was placed.

`SDLORA_TEST_DEVICE` picks it: `cuda` (the default) or `cpu`. On a machine without CUDA the `gpu` tests skip (CI is
CPU-only); `SDLORA_TEST_DEVICE=cpu` runs the same tests on the CPU, which proves their own logic without a GPU
(benchmarks/gpu_check.py --device cpu does). `cpu` also sets ACCELERATE_USE_CPU for this process and its children,
so training stays on the CPU where CUDA is present.

Each `gpu` test reuses a CPU test's logic with this device; the session-wide spy on training/setup.py's `place_models`
records the device of every run (fixtures' runs included), so a test that silently trained on another device fails.
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = os.environ.get("SDLORA_TEST_DEVICE", "cuda")
if DEVICE not in ("cuda", "cpu"):
    raise ValueError(f"SDLORA_TEST_DEVICE={DEVICE!r}: allowed cuda, cpu")
if DEVICE == "cpu":
    os.environ["ACCELERATE_USE_CPU"] = "true"  # Accelerate's own switch: read by every Accelerator, children too

MARKS = [pytest.mark.gpu,
         pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                            reason="no CUDA device (SDLORA_TEST_DEVICE=cpu runs these tests on the CPU)")]

_placed: list[str] = []  # the device type of every place_models call since the spy was installed


@pytest.fixture(scope="session", autouse=True)
def _record_placements():
    """Spy (not a mock: the real function runs) on training/setup.py's place_models for the whole session."""
    import sdlora.training.setup as setup

    real = setup.place_models

    def recording(comps, layers, device, *args, **kwargs):
        _placed.append(torch.device(device).type)
        return real(comps, layers, device, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(setup, "place_models", recording)
        yield


@pytest.fixture
def placed():
    """Call after the test's training: every run of the session was placed on DEVICE, and (`new`) this test ran one
    (new=False where the training ran in a module-scoped fixture, before this fixture started counting)."""
    start = len(_placed)

    def check(new: bool = True) -> None:
        assert _placed and set(_placed) == {DEVICE}, _placed
        assert not new or len(_placed) > start, "the test trained nothing"

    return check


def spy(monkeypatch, module, name: str) -> list:
    """Replace `module.name` by a wrapper that records each call's return value (the real function runs)."""
    real, seen = getattr(module, name), []

    def recording(*args, **kwargs):
        value = real(*args, **kwargs)
        seen.append(value)
        return value

    monkeypatch.setattr(module, name, recording)
    return seen
