"""Data parallel on CPU: `accelerate launch` with 2 processes x batch 1 ends with the adapter of 1 process x batch 2.

Equality holds because the data sampler gives process r slice r of each global batch, every process draws
the noise, latent eps and timesteps of the whole global batch from one generator and keeps its slice, and
DDP averages the per-process mean losses' gradients (= the gradient of the global mean).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdlora.config import dump_yaml
from sdlora.training.loop import train

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
# fp32; the all-reduce sums the two half-batch gradients in another order than one batch does, and Adam's
# normalisation magnifies that rounding in near-zero gradients. Measured: 2.4e-4 of a tensor's largest entry
# after 3 steps; a different noise draw or data order gives differences of order 1.
REL_TOL = 1e-3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(cfg_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(ROOT / "train.py"), "--config", str(cfg_path)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


PRESERVATION = {"weight": 1.0, "source": "prompts", "prompts": ["a photo of a dog", "a red car", "a blue house"]}


@pytest.mark.parametrize("reg, lora", [({}, {}), ({"preservation": PRESERVATION}, {}), ({}, {"merge_every": 1})],
                         ids=["plain", "preservation", "merge_every"])
def test_two_processes_end_with_the_single_process_adapter(make_config, tmp_path, reg, lora):
    """With reg.preservation too: each process must take its slice of the global batch's preservation prompts
    (before that fix both processes used the first prompt of the draw and this failed). With lora.merge_every: every
    process merges and restarts its replica alike (the exported total holds both merged pieces)."""
    common = {"train": {"max_steps": STEPS, "seed": 3}, "lora": {"init": "orthogonal", **lora}, "reg": reg}
    parallel = make_config(common, train={"max_steps": STEPS, "seed": 3, "batch_size": 1},
                           output={"dir": str(tmp_path / "parallel")})
    cfg_path = tmp_path / "parallel.yaml"
    cfg_path.write_text(dump_yaml(parallel))
    run = launch_two_processes(cfg_path)
    assert run.returncode == 0, run.stderr[-3000:]

    single = make_config(common, train={"max_steps": STEPS, "seed": 3, "batch_size": 2},
                         output={"dir": str(tmp_path / "single")})
    reference = load_file(train(single, log=lambda *a: None).adapter_path)
    got = load_file(tmp_path / "parallel" / "adapter.safetensors")
    assert got.keys() == reference.keys()
    worst = max(float((got[k] - reference[k]).abs().max()) / (float(reference[k].abs().max()) + 1e-12) for k in got)
    print(f"largest relative difference of an adapter tensor: {worst:.2e}")
    assert worst <= REL_TOL

    # Only rank 0 wrote: one metrics line per step (two writers would double them), one finished run marker.
    lines = (tmp_path / "parallel" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, STEPS + 1))
    assert json.loads((tmp_path / "parallel" / "run.json").read_text())["status"] == "finished"
    assert "sdlora: trained" in run.stdout + run.stderr and (run.stdout + run.stderr).count("sdlora: trained") == 1


def test_global_batch_draws_do_not_depend_on_the_process_count():
    from types import SimpleNamespace

    from sdlora.training.draws import GlobalBatchDraws

    def draws(num_processes, index, batch_size):
        gen = torch.Generator().manual_seed(0)
        acc = SimpleNamespace(num_processes=num_processes, process_index=index)
        d = GlobalBatchDraws(gen, torch.zeros(batch_size, 4, 2, 2), batch_size, acc)
        return torch.cat([d.randn().flatten(1), d.normal((4, 2, 2)).flatten(1), d.normal((4, 1, 1)).flatten(1),
                          d.uniform()[:, None], d.integers(0, 1000)[:, None].float()], 1)

    whole = draws(1, 0, 4)
    assert torch.equal(torch.cat([draws(2, 0, 2), draws(2, 1, 2)]), whole)
    assert torch.equal(torch.cat([draws(4, r, 1) for r in range(4)]), whole)
