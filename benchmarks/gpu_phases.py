"""The phases of benchmarks/gpu_check.py: each runs in its own process and returns a JSON-able dict.

A phase returns {"status": "ok" | "failed", ...its numbers}; "failed" means it ran and its checks did not hold
(a test failed, a learning bar was missed). An exception is caught by gpu_check.py and recorded with its traceback.
`ctx` carries the run's settings: device ("cuda" | "cpu"), tiny (bool), work (a scratch folder), tests_k.
"""

from __future__ import annotations

import importlib.util
import json
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
GIB = 2 ** 30
PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "pydantic", "safetensors",
            "scikit-learn", "matplotlib", "pytest", "hypothesis")
# docs/mini.md, "the recipe" row: the CPU's judge scores of the demo's recipe at seeds 0 / 1 / 2 (fractions)
CPU_RECIPE = {"concept": (0.83, 0.78, 0.67), "digit": (0.93, 0.87, 0.90), "colour": (1.0, 1.0, 0.97),
              "unrelated_star": (0.0, 0.07, 0.03)}


def load(name: str, path: Path):
    """A benchmark or test module by path (benchmarks/ and tests/ are not packages)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------- env
def env(ctx) -> dict:
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    out = {"python": platform.python_version(), "packages": versions, "cpus": __import__("os").cpu_count(),
           "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda, "gpu": None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, capability=list(torch.cuda.get_device_capability(0)),
                   gpu_memory_gib=props.total_memory / GIB, bf16_supported=torch.cuda.is_bf16_supported())
    out["status"] = "failed" if ctx["device"] == "cuda" and not torch.cuda.is_available() else "ok"
    return out


# ----------------------------------------------------------------------------------------------- pytest
class _Recorder:
    """A pytest plugin: one JSON line per test outcome, appended and flushed as it happens (a phase stopped at its
    time limit still leaves the tests that finished)."""

    def __init__(self, path: Path):
        self.path = path

    def pytest_runtest_logreport(self, report):
        if report.when != "call" and report.passed:
            return
        outcome = "error" if report.failed and report.when != "call" else report.outcome
        row = {"test": report.nodeid.split("::", 1)[-1], "outcome": outcome, "seconds": round(report.duration, 2)}
        if report.skipped:
            row["reason"] = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        elif report.failed:
            row["message"] = report.longreprtext[-4000:]
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def run_pytest(ctx, name: str, args: list[str]) -> dict:
    """pytest in this process (its device chosen by SDLORA_TEST_DEVICE), the outcomes from the recorder."""
    import os

    import pytest

    os.environ["SDLORA_TEST_DEVICE"] = ctx["device"]
    log = Path(ctx["work"]) / f"{name}.jsonl"  # gpu_check.py reads it back if this process is stopped
    log.unlink(missing_ok=True)
    os.chdir(ROOT)
    code = pytest.main(["-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT), *args], plugins=[_Recorder(log)])
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    counts = {k: sum(r["outcome"] == k for r in rows) for k in ("passed", "failed", "error", "skipped")}
    bad = counts["failed"] + counts["error"]
    return {"status": "failed" if bad or int(code) not in (0, 5) else "ok", "exit_code": int(code), "counts": counts,
            "tests": rows}


def tests(ctx) -> dict:
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_gpu_*.py"))
    return run_pytest(ctx, "tests", ["-m", "gpu", *files, *(["-k", ctx["tests_k"]] if ctx.get("tests_k") else [])])


def learning(ctx) -> dict:
    return run_pytest(ctx, "learning", ["-s", "tests/test_learning.py"])


# ------------------------------------------------------------------------------------------------ speed
SPEED = {  # family: (px, rank); the settings: SD 1.5 at 512 px rank 16, SDXL at 1024 px rank 32
    "sd1": (512, 16), "sdxl": (1024, 32)}
VARIANTS = ["floor", "floor+te_bwd", "sdlora", "peer"]


def speed(ctx, family: str) -> dict:
    sys.path.insert(0, str(BENCHMARKS))
    train_speed = load("train_speed", BENCHMARKS / "train_speed.py")
    px, rank = SPEED[family]
    argv = ["--device", ctx["device"], "--family", family, "--dtype", "bf16", "--doc", "", "--only", *VARIANTS]
    if ctx["tiny"]:  # the tiny model of the family: the plumbing, not the numbers
        argv += ["--arch", "tiny", "--resolution", "64", "--rank", "4", "--warmup", "1", "--steps", "2"]
    else:
        argv += ["--resolution", str(px), "--rank", str(rank), "--warmup", "4" if family == "sd1" else "3",
                 "--steps", "8" if family == "sd1" else "6"]
    out = train_speed.measure(train_speed.parse_args(argv), say=lambda line: print(line, flush=True))
    v = out["variants"]["sdlora"]
    out["goals"] = {"x_floor": v["x_floor"], "within_1.10_of_floor": v["x_floor"] <= 1.10,
                    "x_peer": v["x_peer"], "ahead_of_peer": v["x_peer"] < 1.0}
    out["status"] = "ok"
    return out


def speed_sd1(ctx) -> dict:
    return speed(ctx, "sd1")


def speed_sdxl(ctx) -> dict:
    return speed(ctx, "sdxl")


# ----------------------------------------------------------------------------------------------- memory
def measured_peaks(bench, folder, px: int, cfgs: dict, device, widths, pooled, steps: int = 2) -> list[dict]:
    """The same steps as bench.trace with real tensors on `device`, once per optimiser (`cfgs`: optimiser name ->
    config, the same but for optim.optimizer; the models are built once). CUDA: torch.cuda.max_memory_allocated over
    the steps (all the process holds on the device: weights, adapters, optimiser state, inputs, activations,
    workspaces), max_memory_reserved, and the device's used memory (context included). CPU: bench's MemTracker on the
    real tensors (the --tiny run's stand-in: the same code path, another instrument)."""
    import torch

    from sdlora.lora import build_param_groups
    from sdlora.model.families import SDXL
    from sdlora.training.optim import make_optimizer

    cuda = device.type == "cuda"
    torch.manual_seed(0)
    t0 = time.perf_counter()
    first = next(iter(cfgs.values()))
    comps, layers = bench.build(folder, first, device=device)
    groups = build_param_groups(layers, first, SDXL)
    params = [p for g in groups.groups for p in g["params"]]
    inputs = bench.cached_inputs(px, sum(widths), pooled, widths, device)
    built, rows = time.perf_counter() - t0, []
    for name, cfg in cfgs.items():
        optimizer = make_optimizer(groups.groups, cfg)
        step = bench.make_train_step(comps, cfg, params, optimizer, cuda_lists=cuda, device=device)  # as traced
        row = {"optimizer": name, "build_seconds": built}
        t0 = time.perf_counter()
        if cuda:
            torch.cuda.synchronize()
            row["start_allocated"] = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            for _ in range(steps):
                step(inputs)
            torch.cuda.synchronize()
            free, total = torch.cuda.mem_get_info()
            row.update(max_allocated=torch.cuda.max_memory_allocated(), max_reserved=torch.cuda.max_memory_reserved(),
                       device_used=total - free, instrument="torch.cuda.max_memory_allocated")
        else:
            tracker = bench.StepMemTracker()
            tracker.track_external(comps.unet, comps.vae, *comps.text_encoders.values(), optimizer, inputs["mean"],
                                   inputs["std"], inputs["cond"].hidden, inputs["cond"].pooled)
            with tracker:
                row["start_allocated"] = tracker.total()
                for _ in range(steps):
                    step(inputs)
                    tracker.reset_mod_stats()
            row.update(max_allocated=tracker.by_category("peak")["total"], instrument="MemTracker, real CPU tensors")
        row["step_seconds"] = (time.perf_counter() - t0) / steps
        rows.append(row)
        del optimizer, step  # its state freed before the next optimiser's steps (gradients: set to None each step)
    del comps, layers, params, groups, inputs
    if cuda:
        torch.cuda.empty_cache()
    return rows


def memory(ctx) -> dict:
    """The traced estimates (benchmarks/sdxl_memory.py, docs/sdxl-memory.md) against the real step's peak."""
    import tempfile

    import torch

    sys.path.insert(0, str(BENCHMARKS))
    bench = load("sdxl_memory", BENCHMARKS / "sdxl_memory.py")
    from sdlora.model.tiny import TINY_SDXL_PROJECTION, TINY_SDXL_TE1, TINY_SDXL_TE2, make_tiny_sdxl

    device = torch.device(ctx["device"])
    rows = []
    with tempfile.TemporaryDirectory(dir=ctx["work"]) as tmp:  # (a) the tiny SDXL model: traced now, then run
        tiny = make_tiny_sdxl(Path(tmp) / "tiny")
        px = 64 if ctx["tiny"] else 128
        cfg = bench.sdxl_config(True, {"lora": {"rank": 4, "alpha": 4}})
        kw = {"widths": (TINY_SDXL_TE1, TINY_SDXL_TE2), "pooled": TINY_SDXL_PROJECTION}
        traced = bench.trace(tiny, px, cfg, fake=True, cuda_lists=device.type == "cuda", **kw)
        real = measured_peaks(bench, tiny, px, {"adamw": cfg}, device, **kw)[0]
        rows.append({"model": "tiny SDXL", "px": px, "traced_peak": traced["peak"]["total"], **real})
    if ctx["tiny"]:
        skipped = "tiny mode: the full SDXL step is for the GPU run"
    else:  # (b) the full SDXL step of docs/sdxl-memory.md: its committed estimate against the real step
        estimate = json.loads((ROOT / "docs" / "sdxl-memory.json").read_text())
        run = next(r for r in estimate["runs"] if r["px"] == 1024 and r["checkpointing"] and r["cuda_lists"])
        optimizers = ["adamw"] + (["adamw8bit"] if importlib.util.find_spec("bitsandbytes") else [])
        traced = {"adamw": run["peak"]["total"], "adamw8bit": max(  # the script's with_adam8bit, from the JSON
            p["total"] - p.get("optimiser state", 0) + run["adam8bit_state_bytes"] for p in run["phase_peaks"].values())}
        cfgs = {name: bench.sdxl_config(True, {"optim": {"optimizer": name}}) for name in optimizers}
        for real in measured_peaks(bench, bench.SDXL_CONFIGS, 1024, cfgs, device, widths=(768, 1280), pooled=1280):
            peak = traced[real["optimizer"]]
            rows.append({"model": "SDXL", "px": 1024, "traced_peak": peak, "gpu_estimate": bench.on_gpu(peak), **real})
        skipped = None if optimizers == ["adamw", "adamw8bit"] else "adamw8bit: bitsandbytes not installed"
    for r in rows:
        r["measured_over_traced"] = r["max_allocated"] / r["traced_peak"]
    return {"status": "ok", "rows": rows, "not_measured": skipped,
            "assumptions": {"cuda_context_gib": bench.CUDA_CONTEXT_GIB, "fragmentation": bench.FRAGMENTATION}}


# ------------------------------------------------------------------------------------------------- demo
def demo(ctx) -> dict:
    """`sdlora demo` on the device, its judge's scores held to the learning test's bars and to the CPU's seeds."""
    from sdlora.commands.demo import DEMO_STEPS, run_demo

    bars_module = load("test_learning", ROOT / "tests" / "test_learning.py")
    steps = 20 if ctx["tiny"] else DEMO_STEPS  # 20: the recipe's warm-up, the fewest steps it allows
    outputs = run_demo(Path(ctx["work"]) / "demo", steps=steps)
    s = outputs["scores"]
    base, adapted = s["base"], s["adapted"]
    b = bars_module
    bars = {"concept_learned": adapted["concept"] >= b.CONCEPT_LEARNED,
            "base_lacks_concept": base["concept"] <= b.BASE_CONCEPT_AT_MOST,
            "digit_kept": adapted["digit"] >= base["digit"] - b.DIGIT_MARGIN,
            "colour_kept": adapted["colour"] >= base["colour"] - b.COLOUR_MARGIN,
            "no_bleed": adapted["unrelated_star"] <= b.BLEED_AT_MOST}
    # Within the CPU's seed spread: the three CPU seeds' range, widened by one evaluation sample either side.
    sample = {"concept": 1 / adapted["n_concept"], "digit": 1 / adapted["n_unrelated"],
              "colour": 1 / adapted["n_unrelated"], "unrelated_star": 1 / adapted["n_unrelated"]}
    spread = {k: min(v) - sample[k] <= adapted[k] <= max(v) + sample[k] for k, v in CPU_RECIPE.items()}
    passed = all(bars.values())
    return {"status": "ok" if passed or ctx["tiny"] else "failed", "steps": steps, "scores": s, "bars": bars,
            "bars_apply": not ctx["tiny"], "within_cpu_seed_spread": spread, "cpu_recipe": CPU_RECIPE,
            "seconds_demo": outputs["seconds"]}


PHASES = {"env": env, "tests": tests, "speed_sd1": speed_sd1, "speed_sdxl": speed_sdxl, "memory": memory,
          "demo": demo, "learning": learning}
