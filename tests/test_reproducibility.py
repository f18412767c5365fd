"""What docs/training.md promises about repeated runs: on CPU with one thread, the same config and seed give a
bit-identical adapter (with several threads, reductions may be split differently: see the docs for the bound)."""

import torch
from safetensors.torch import load_file

from sdlora.training.loop import train


def test_two_identical_single_thread_cpu_runs_give_bit_identical_adapters(make_config, tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # what OMP_NUM_THREADS=1 gives a fresh process
    try:
        adapters = [load_file(train(make_config(train={"max_steps": 4}, output={"dir": str(tmp_path / f"run{i}")}),
                                    log=lambda *a: None).adapter_path) for i in range(2)]
    finally:
        torch.set_num_threads(before)
    first, second = adapters
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)  # bit for bit, no tolerance
