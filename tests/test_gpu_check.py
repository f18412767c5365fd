"""benchmarks/gpu_check.py's plumbing on the CPU (--device cpu --tiny), short: every phase runs or is recorded as
skipped with a reason, a phase that raises or hangs is recorded and the next one still runs, and the JSON holds
every field the markdown summary reads (the summary rebuilt from the file equals the one written)."""

import importlib.util
import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_gpu_check():
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("gpu_check", BENCHMARKS / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_tiny_cpu_run_records_every_phase(tmp_path, monkeypatch):
    gpu_check = load_gpu_check()
    from gpu_summary import summary_markdown

    # speed_sdxl hangs and is stopped at a 3 s limit; demo raises; memory is left out; learning is skipped by --tiny
    monkeypatch.setitem(gpu_check.PHASE_LIMITS, "speed_sdxl", (3, 3))
    monkeypatch.setenv("SDLORA_GPU_CHECK_FAULT", "speed_sdxl:hang,demo")
    out = tmp_path / "out"
    args = gpu_check.parse_args(["--out", str(out), "--device", "cpu", "--tiny", "--work", str(tmp_path / "work"),
                                 "--only", "env,tests,speed_sd1,speed_sdxl,demo,learning",
                                 "--tests-k", "test_adamw_is_fused"])
    report = gpu_check.run_all(args)

    phases = report["phases"]
    assert list(phases) == list(gpu_check.ORDER)
    status = {name: r["status"] for name, r in phases.items()}
    assert status == {"env": "ok", "tests": "ok", "speed_sd1": "ok", "speed_sdxl": "timeout", "memory": "skipped",
                      "demo": "error", "learning": "skipped"}, {n: (r["status"], r.get("error")) for n, r in phases.items()}
    assert all(r["reason"] for r in phases.values() if r["status"] == "skipped")
    assert "not selected" in phases["memory"]["reason"] and "tiny mode" in phases["learning"]["reason"]
    assert phases["env"]["packages"]["torch"] and phases["env"]["cuda_available"] is False
    # the tests phase ran the one selected `gpu` test on the CPU and recorded it
    assert phases["tests"]["counts"]["passed"] == 1 and phases["tests"]["tests"][0]["outcome"] == "passed"
    variants = phases["speed_sd1"]["variants"]
    assert list(variants) == ["floor", "floor+te_bwd", "sdlora", "peer"]
    assert all(v["s_median"] > 0 and v["peak_mib"] > 0 for v in variants.values())
    assert phases["speed_sd1"]["settings"]["arch"] == "tiny" and "x_peer" in phases["speed_sd1"]["goals"]
    assert "stopped at its time limit of 3 s" in phases["speed_sdxl"]["error"]
    assert "fault injected" in phases["demo"]["error"] and "Traceback" in phases["demo"]["error"]

    written = json.loads((out / "gpu_check.json").read_text())
    assert written["phases"].keys() == phases.keys()
    markdown = (out / "gpu_check.md").read_text()
    assert summary_markdown(written) == markdown  # every field the summary reads is in the file
    for name, r in phases.items():
        assert f"| {name} | {r['status']} |" in markdown
    for section in ("### `gpu` tests (1 passed)", "### Speed: SD 1.5", "### speed_sdxl: timeout", "### demo: error"):
        assert section in markdown, section
    log = (out / "gpu_check.log").read_text()
    assert "===== tests: ok" in log and "===== demo: error" in log
