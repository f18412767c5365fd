"""One command for a GPU session (issue 31): every CUDA path tested, training speed and memory measured against the
floor, the peer and the traced estimate, and the demo judged on the GPU; one JSON and one markdown summary.

    python3 benchmarks/gpu_check.py --out gpu-check                      # CUDA: the full run, under 8 min on an H100
    python3 benchmarks/gpu_check.py --out gpu-check --only tests,memory   # a subset (e.g. to rerun what failed)
    python3 benchmarks/gpu_check.py --out /tmp/gc --device cpu --tiny     # the same script end to end on the CPU

Phases, in this order (benchmarks/gpu_phases.py has each one's code):
  env         versions, the GPU's name and memory
  tests       `pytest -m gpu tests/test_gpu_*.py` on the device (SDLORA_TEST_DEVICE): bf16/fp16 with the scaler,
              fused and 8-bit AdamW, gradient checkpointing, compile, EMA on the CPU, resume after a kill, exports
  speed_sd1   benchmarks/train_speed.py: SD 1.5's architecture, 512 px, bf16, batch 1, rank 16, cached latents:
              floor, floor+te_bwd, sdlora, peer (peft as diffusers' examples set it up); s/step and peak memory
  speed_sdxl  the same for SDXL at 1024 px, rank 32
  memory      benchmarks/sdxl_memory.py's traced peak (docs/sdxl-memory.json) against torch.cuda.max_memory_allocated
              for the same step (and the tiny SDXL model, traced and run here)
  demo        `sdlora demo` on the device: the judge's scores against the learning test's bars and the CPU's seeds
  learning    tests/test_learning.py on the device
--tiny swaps in the tiny models and a few steps (the numbers mean nothing; the plumbing is what runs).

Each phase runs in its own process with its own time limit (PHASE_LIMITS, cut to what is left of --budget); a phase
that raises is recorded with its traceback, one that runs past its limit or dies is stopped and recorded with the end
of its output, and the next phase runs. After every phase, --out gets gpu_check.json and gpu_check.md (rewritten
atomically) and gpu_check.log (the phases' output). SDLORA_GPU_CHECK_FAULT=<phase>[:hang][,...] makes those phases
raise (or hang) at their start: how tests/test_gpu_check.py proves the recording.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sdlora.util import atomic  # noqa: E402

ORDER = ("env", "tests", "speed_sd1", "speed_sdxl", "memory", "demo", "learning")
# seconds per phase: (CUDA full run, --tiny on a CPU). The full run's sum is over the budget on purpose: a phase that
# ends early leaves its time to the next, and the last ones are skipped (with the reason) when the budget runs out.
PHASE_LIMITS = {"env": (60, 120), "tests": (210, 1200), "speed_sd1": (75, 400), "speed_sdxl": (150, 500),
                "memory": (120, 500), "demo": (120, 900), "learning": (150, 0)}
BUDGET = {False: 450, True: 3600}  # total seconds: the full run ends well inside 8 minutes
MIN_PHASE_S = 20  # a phase is not started with less than this left
LOG_TAIL = 6000  # characters of a stopped phase's output kept in the JSON
JSON_NAME, MD_NAME, LOG_NAME = "gpu_check.json", "gpu_check.md", "gpu_check.log"


# ------------------------------------------------------------------------------------------- the child
def run_phase(name: str, ctx: dict, result_path: Path) -> int:
    """In the phase's own process: run it, catch anything it raises, write its result as JSON."""
    from gpu_phases import PHASES

    try:
        faults = dict(f.partition(":")[::2] for f in os.environ.get("SDLORA_GPU_CHECK_FAULT", "").split(",") if f)
        if name in faults:
            if faults[name] == "hang":
                time.sleep(10 ** 6)
            raise RuntimeError(f"fault injected by SDLORA_GPU_CHECK_FAULT ({name})")
        result = PHASES[name](ctx)
    except BaseException:  # noqa: B036  (a KeyboardInterrupt or SystemExit inside a phase is recorded too)
        result = {"status": "error", "error": traceback.format_exc()}
    atomic.write_text(result_path, json.dumps(result, indent=1, default=str))
    return 0


# ------------------------------------------------------------------------------------------ the parent
def child_env(device: str) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU, also on a machine with a GPU
    # tests/conftest.py sets 2 threads (CI's cores) unless told; the demo's judge and sampling run on the CPU
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    return env


def run_child(name: str, args, limit: float) -> dict:
    work = Path(args.work)
    result_path, log_path = work / f"{name}.result.json", work / f"{name}.log"
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", name, "--device", args.device, "--work",
           str(work), "--out", args.out] + (["--tiny"] if args.tiny else []) + (["--tests-k", args.tests_k]
                                                                                 if args.tests_k else [])
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(args.device), cwd=ROOT,
                                start_new_session=True)  # its own process group: stopped whole, pytest's children too
        try:
            proc.wait(timeout=limit)
            stopped = None
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # it ended in between
                pass
            proc.wait()
            stopped = f"stopped at its time limit of {limit:.0f} s"
    seconds = time.perf_counter() - t0
    output = log_path.read_text(encoding="utf-8", errors="replace")
    if stopped is None and result_path.is_file():
        result = json.loads(result_path.read_text())
    else:
        why = stopped or f"its process ended with code {proc.returncode} and wrote no result"
        result = {"status": "timeout" if stopped else "error", "error": why, "log_tail": output[-LOG_TAIL:]}
        partial = work / f"{name}.jsonl"  # tests that finished before the stop (gpu_phases._Recorder)
        if partial.is_file():
            result["tests"] = [json.loads(line) for line in partial.read_text().splitlines() if line.strip()]
    if result.get("status") == "error" and "log_tail" not in result:
        result["log_tail"] = output[-LOG_TAIL:]
    result.update(seconds=round(seconds, 1), limit_s=round(limit))
    with open(Path(args.out) / LOG_NAME, "a", encoding="utf-8") as log:  # the whole run's output, phase by phase
        log.write(f"\n===== {name}: {result['status']} in {seconds:.0f} s =====\n{output[-300_000:]}")
    return result


def skip_reason(name: str, args, report: dict, left: float) -> str | None:
    if args.only and name not in args.only:
        return f"not selected (--only {','.join(args.only)})"
    if args.tiny and PHASE_LIMITS[name][1] == 0:
        return "tiny mode: the learning test trains 150 steps on sdlora-mini (minutes on a CPU); the GPU run has it"
    env = report["phases"].get("env", {})
    if name != "env" and args.device == "cuda" and env.get("status") == "failed":
        return "no CUDA device (see the env phase)"
    if left < MIN_PHASE_S:
        return f"total budget: {left:.0f} s left of {args.budget:.0f} s"
    return None


def write_report(report: dict, out: Path) -> None:
    from gpu_summary import summary_markdown

    atomic.write_text(out / JSON_NAME, json.dumps(report, indent=1, default=str) + "\n")
    atomic.write_text(out / MD_NAME, summary_markdown(report))


def run_all(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / LOG_NAME).unlink(missing_ok=True)
    t0 = time.perf_counter()
    report = {"command": "python3 benchmarks/gpu_check.py " + " ".join(args.argv),
              "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "device": args.device, "tiny": args.tiny, "budget_s": args.budget, "phases": {}}
    for name in ORDER:
        left = args.budget - (time.perf_counter() - t0)
        reason = skip_reason(name, args, report, left)
        if reason:
            report["phases"][name] = {"status": "skipped", "reason": reason}
        else:
            print(f"gpu_check: {name} (limit {min(left, PHASE_LIMITS[name][args.tiny]):.0f} s)", flush=True)
            report["phases"][name] = run_child(name, args, min(left, PHASE_LIMITS[name][args.tiny]))
            print(f"gpu_check: {name}: {report['phases'][name]['status']} in {report['phases'][name]['seconds']} s",
                  flush=True)
        report["seconds"] = round(time.perf_counter() - t0, 1)
        write_report(report, out)
    return report


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help=f"folder for {JSON_NAME}, {MD_NAME} and {LOG_NAME}")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="tiny models, few steps, small images: the plumbing only")
    p.add_argument("--only", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                   help=f"comma-separated phases to run ({','.join(ORDER)}); the others are recorded as skipped")
    p.add_argument("--budget", type=float, help=f"total seconds (default {BUDGET[False]}; {BUDGET[True]} with --tiny)")
    p.add_argument("--tests-k", default="", help="pytest -k expression for the tests phase")
    p.add_argument("--work", help="scratch folder (run folders, phase logs); default: a new temporary folder")
    p.add_argument("--phase", help=argparse.SUPPRESS)  # internal: run one phase in this process
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    unknown = set(args.only or ()) - set(ORDER)
    if unknown:
        p.error(f"--only: unknown phase(s) {', '.join(sorted(unknown))}; allowed: {', '.join(ORDER)}")
    if args.budget is None:
        args.budget = BUDGET[args.tiny]
    if args.work is None:
        import tempfile

        args.work = tempfile.mkdtemp(prefix="gpu_check_")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.phase:
        ctx = {"device": args.device, "tiny": args.tiny, "work": args.work, "tests_k": args.tests_k}
        return run_phase(args.phase, ctx, Path(args.work) / f"{args.phase}.result.json")
    report = run_all(args)
    print(Path(args.out, MD_NAME).read_text())
    bad = [n for n, r in report["phases"].items() if r["status"] not in ("ok", "skipped")]
    print(f"gpu_check: {len(ORDER) - len(bad)} of {len(ORDER)} phases ok or skipped"
          + (f"; not ok: {', '.join(bad)}" if bad else "") + f"; {report['seconds']:.0f} s; {args.out}/{JSON_NAME}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
