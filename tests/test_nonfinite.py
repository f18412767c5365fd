"""Nothing non-finite is ever trained into the weights or written: a huge learning rate (1e4 for 1e-4) gives
finite losses but NaN gradients; those steps make no update, and every file the run writes holds finite tensors."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdlora.training.checkpoint import verify_checkpoint
from sdlora.util import atomic
from sdlora.errors import NonFiniteWeights
from sdlora.training.nonfinite import NonFiniteLoss
from sdlora.training.loop import train


def saved_tensor_files(out: Path) -> list[Path]:
    return sorted(out.rglob("*.safetensors")) + sorted(out.rglob("optimizer.pt"))


def all_finite(path: Path) -> bool:
    if path.suffix == ".pt":
        state = torch.load(path, weights_only=True)["state"]
        tensors = [v for s in state.values() for v in s.values() if torch.is_tensor(v)]
    else:
        tensors = list(load_file(path).values())
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def test_a_huge_learning_rate_never_writes_non_finite_tensors_and_the_stop_names_a_finite_state(make_config, tmp_path):
    lines = []
    cfg = make_config(optim={"lr": 1.0e+4, "max_grad_norm": None}, output={"dir": str(tmp_path / "run")},
                      train={"max_steps": 6, "max_nonfinite_steps": 3}, checkpoint={"every_steps": 2, "keep_last": 2})
    message = None
    try:
        train(cfg, log=lines.append)
    except (NonFiniteLoss, NonFiniteWeights) as e:
        message = str(e)
    out = Path(cfg.output.dir)
    print("\n".join(lines[-6:]), message, sep="\n")
    files = saved_tensor_files(out)
    assert files and all(all_finite(f) for f in files), [f for f in files if not all_finite(f)]
    if message is not None:  # the run stopped: the state it names exists, is intact and finite
        named = [Path(w.rstrip(",;")) for w in message.split() if "checkpoints/step_" in w]
        assert named, message
        for folder in named:
            assert verify_checkpoint(folder) is None and all(all_finite(f) for f in folder.glob("*.safetensors"))
        assert json.loads((out / "run.json").read_text())["status"] == "stopped_nonfinite"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["nonfinite_steps"] >= 1  # the NaN-gradient steps were caught, counted and reported
    assert any("non-finite gradients, step skipped" in line for line in lines), lines


def test_a_non_finite_tensor_is_never_written(tmp_path):
    path = tmp_path / "adapter.safetensors"
    with pytest.raises(NonFiniteWeights, match="up holds non-finite values"):
        atomic.save_safetensors(path, {"down": torch.ones(2), "up": torch.tensor([1.0, float("nan")])})
    assert not list(tmp_path.iterdir())
