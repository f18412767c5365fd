"""Every logged scalar describes the step it is logged at: the LR that step applied, and with gradient
accumulation the mean over the step's micro-batches (not the last one's)."""

import json
from pathlib import Path

import pytest
import torch

from sdlora.training.optim import lr_lambda
from sdlora.training.loop import train

STEPS, ACCUMULATE, WARMUP, WEIGHT = 3, 2, 2, 0.1


def test_logged_lr_and_losses_are_the_ones_each_step_used(make_config, tmp_path):
    micro_losses = {}  # step -> every micro-batch's loss, as the loop computed it

    def record(step, loss):
        micro_losses.setdefault(step, []).append(float(loss))
        return loss

    cfg = make_config(train={"max_steps": STEPS, "gradient_accumulation_steps": ACCUMULATE},
                      optim={"scheduler": "linear", "warmup_steps": WARMUP}, output={"dir": str(tmp_path / "run")},
                      reg={"embedding_norm": {"weight": WEIGHT}}, checkpoint={"every_steps": 0})
    train(cfg, fault_hook=record, log=lambda *a: None)
    out = Path(cfg.output.dir)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))

    # The LR step N applied is LambdaLR's factor for index N-1 times the group's base rate (initial_lr, saved in
    # the last checkpoint's optimiser state). With warm-up 2: step 1 applies half the base rate; the linear decay
    # reaches 0 only after the last step. Exact equality: LambdaLR multiplies the same two Python floats.
    ckpt = out / "checkpoints" / f"step_{STEPS:06d}"
    groups = torch.load(ckpt / "optimizer.pt", weights_only=True)["param_groups"]
    names = json.loads((ckpt / "trainer_state.json").read_text())["group_names"]
    factor = lr_lambda("linear", WARMUP, STEPS)
    for m in metrics:
        for name, group in zip(names, groups):
            assert m[f"lr/{name}"] == group["initial_lr"] * factor(m["step"] - 1), (m["step"], name)
    assert metrics[0][f"lr/{names[0]}"] == groups[0]["initial_lr"] / WARMUP and metrics[-1][f"lr/{names[0]}"] > 0

    # Loss: the mean of the step's micro-batch losses (one process here, so no mean over processes).
    # fp32 scalars of size ~1 averaged in another order: 1e-6 relative is ~10 float32 ulps.
    for m in metrics:
        used = micro_losses[m["step"]]
        assert len(used) == ACCUMULATE and used[0] != used[1]
        mean = sum(used) / ACCUMULATE
        assert abs(m["loss"] - mean) <= 1e-6 * abs(mean), (m["step"], m["loss"], used)
        # the other scalars are means over the same micro-batches: loss = diffusion_loss + weight * penalty holds
        combined = m["diffusion_loss"] + WEIGHT * m["embedding_norm/penalty"]
        assert abs(m["loss"] - combined) <= 1e-6 * abs(mean), m


def test_the_default_tensorboard_tracker_writes_the_loss_under_output_dir_logs(make_config, tmp_path):
    cfg = make_config(train={"max_steps": 2}, log={"tracker": "tensorboard"}, output={"dir": str(tmp_path / "run")},
                      checkpoint={"every_steps": 0})
    train(cfg, log=lambda *a: None)
    logs = Path(cfg.output.dir) / "logs"  # the folder README and docs/training.md give to `tensorboard --logdir`
    events = sorted(logs.rglob("events.out*"))
    assert events, f"no TensorBoard event file under {logs}"
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    metrics = [json.loads(line) for line in (Path(cfg.output.dir) / "metrics.jsonl").read_text().splitlines()]
    found = {}
    for path in events:
        acc = event_accumulator.EventAccumulator(str(path))
        acc.Reload()
        if "loss" in acc.Tags()["scalars"]:
            found.update({e.step: e.value for e in acc.Scalars("loss")})
    # TensorBoard stores scalars as float32: equal to metrics.jsonl's float64 loss up to float32 rounding (2^-24 relative)
    assert sorted(found) == [1, 2]
    for m in metrics:
        assert found[m["step"]] == pytest.approx(m["loss"], rel=1e-6), m["step"]
