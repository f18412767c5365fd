"""The markdown summary of a benchmarks/gpu_check.py report (its JSON): what gets pasted into docs/benchmarks.md.

Reads, per phase: status, seconds, reason (skipped), error (crashed or stopped); env: gpu, packages, torch_cuda;
tests: counts, tests[test, outcome, seconds, reason | message]; speed_*: settings, variants, goals;
memory: rows[model, px, optimizer, traced_peak, max_allocated, ...]; demo: steps, scores, bars, within_cpu_seed_spread.
"""

from __future__ import annotations

GIB = 2 ** 30


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def num(x, fmt=".3f") -> str:
    return "-" if x is None else format(x, fmt)


def phase_table(report: dict) -> list[str]:
    rows = ["| phase | status | seconds (limit) | note |", "|---|---|---|---|"]
    for name, r in report["phases"].items():
        note = r.get("reason") or ""
        if r.get("error"):
            note = r["error"].strip().splitlines()[-1][:200]
        elif name == "tests" and "counts" in r:
            note = ", ".join(f"{v} {k}" for k, v in r["counts"].items() if v)
        elif name.startswith("speed") and "goals" in r:
            g = r["goals"]
            note = f"sdlora x floor {num(g['x_floor'])}, x peer {num(g['x_peer'])}"
        seconds = f"{r['seconds']:.0f} ({r['limit_s']})" if "seconds" in r else "-"
        rows.append(f"| {name} | {r['status']} | {seconds} | {note.replace('|', '/')} |")
    return rows


def tests_section(r: dict, title: str = "`gpu` tests") -> list[str]:
    counts = r.get("counts")  # a phase stopped at its limit has only the rows of the tests that finished
    if counts is None:
        counts = {k: sum(t["outcome"] == k for t in r.get("tests", [])) for k in ("passed", "failed", "error", "skipped")}
        title += ", stopped before the end"
    rows = [f"### {title} ({', '.join(f'{v} {k}' for k, v in counts.items() if v) or 'none ran'})",
            "", "| test | outcome | s | reason / message |", "|---|---|---|---|"]
    for t in r.get("tests", []):
        lines = (t.get("message") or "").strip().splitlines()
        errors = [line[1:].strip() for line in lines if line.startswith("E ")]  # pytest's "E   assert ..." lines
        why = t.get("reason") or (errors[0] if errors else lines[-1] if lines else "")
        rows.append(f"| {t['test']} | {t['outcome']} | {t['seconds']:.1f} | {why[:160].replace('|', '/')} |")
    return rows


def speed_section(name: str, r: dict) -> list[str]:
    s = r["settings"]
    model = {"sd1": "SD 1.5", "sdxl": "SDXL"}[s["family"]] + (" (tiny: numbers meaningless)" if s["arch"] == "tiny" else "")
    g = r["goals"]
    rows = [f"### Speed: {model}, {s['resolution']} px, {s['dtype']}, batch 1, rank {s['rank']} ({s['warmup']} warm-up"
            f" + {s['steps']} timed rounds)", "",
            f"sdlora x floor {num(g['x_floor'])} (goal <= 1.10: {'met' if g['within_1.10_of_floor'] else 'not met'}); "
            f"x peer {num(g['x_peer'])} (goal < 1: {'met' if g['ahead_of_peer'] else 'not met'}).", "",
            "| variant | s/step median | best | x floor | x floor+te_bwd | x peer | peak MiB |", "|---|---|---|---|---|---|---|"]
    for v, x in r["variants"].items():
        rows.append(f"| {v} | {x['s_median']:.4f} | {x['s_best']:.4f} | {num(x['x_floor'])} | {num(x['x_floor_te_bwd'])} "
                    f"| {num(x['x_peer'])} | {x['peak_mib']:.0f} |")
    return rows


def memory_section(r: dict) -> list[str]:
    rows = ["### Memory: the traced estimate against the real step", "",
            "| model | px | optimiser | traced peak GiB | measured GiB (instrument) | measured / traced "
            "| GPU estimate GiB | max reserved GiB | device used GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for m in r["rows"]:
        g = lambda k: f"{m[k] / GIB:.3f}" if m.get(k) is not None else "-"  # noqa: E731
        rows.append(f"| {m['model']} | {m['px']} | {m['optimizer']} | {g('traced_peak')} | {g('max_allocated')} "
                    f"({m['instrument']}) | {m['measured_over_traced']:.3f} | {g('gpu_estimate')} | {g('max_reserved')} "
                    f"| {g('device_used')} |")
    if r.get("not_measured"):
        rows += ["", f"Not measured: {r['not_measured']}."]
    return rows


def demo_section(r: dict) -> list[str]:
    b, a = r["scores"]["base"], r["scores"]["adapted"]
    cpu = r["cpu_recipe"]
    spread = r["within_cpu_seed_spread"]
    rows = [f"### Demo on the device ({r['steps']} steps)" + ("" if r["bars_apply"] else " (tiny: bars not applied)"),
            "", "| | star on trigger | digit | colour | unrelated drawn as star |", "|---|---|---|---|---|",
            f"| base | {pct(b['concept'])} | {pct(b['digit'])} | {pct(b['colour'])} | {pct(b['unrelated_star'])} |",
            f"| adapted, this run | {pct(a['concept'])} | {pct(a['digit'])} | {pct(a['colour'])} "
            f"| {pct(a['unrelated_star'])} |",
            "| adapted, CPU seeds 0 / 1 / 2 (docs/mini.md) | " + " | ".join(" / ".join(pct(x) for x in cpu[k]) for k in
                                                                        ("concept", "digit", "colour", "unrelated_star"))
            + " |", "| within the CPU seeds' range (+- one sample) | " + " | ".join(
                "yes" if spread[k] else "no" for k in ("concept", "digit", "colour", "unrelated_star")) + " |", "",
            "The learning test's bars: " + ", ".join(f"{k} {'met' if v else 'missed'}" for k, v in r["bars"].items())
            + "."]
    return rows


def summary_markdown(report: dict) -> str:
    env = report["phases"].get("env", {})
    gpu = env.get("gpu") or ("none" if "packages" in env else "unknown")
    pk = env.get("packages", {})
    versions = ", ".join(f"{k} {pk.get(k)}" for k in ("torch", "diffusers", "transformers", "peft", "bitsandbytes") if k in pk)
    tiny = " (--tiny: the plumbing, numbers meaningless)" if report["tiny"] else ""
    lines = [f"## gpu_check: {report['device'].upper()}, GPU: {gpu}, {report['started']}{tiny}", "",
             f"Command: `{report['command']}`  ", f"CUDA {env.get('torch_cuda')}; {versions}; "
             f"{report.get('seconds', 0):.0f} s of a {report['budget_s']:.0f} s budget", ""]
    lines += phase_table(report)
    p = report["phases"]
    sections = [("tests", tests_section), ("speed_sd1", lambda r: speed_section("speed_sd1", r)),
                ("speed_sdxl", lambda r: speed_section("speed_sdxl", r)), ("memory", memory_section),
                ("demo", demo_section), ("learning", lambda r: tests_section(r, "tests/test_learning.py"))]
    for name, section in sections:
        r = p.get(name)
        if r and r["status"] in ("ok", "failed") or (name in ("tests", "learning") and r and r.get("tests")):
            try:
                lines += [""] + section(r)
            except (KeyError, TypeError, ZeroDivisionError) as e:  # a summary never hides the JSON it summarises
                lines += ["", f"### {name}: the summary could not read this phase's result ({type(e).__name__}: {e})"]
    failures = [(n, r["error"]) for n, r in p.items() if r.get("error")]
    for name, error in failures:
        lines += ["", f"### {name}: {p[name]['status']}", "", "```", error.strip()[-3000:], "```"]
        if p[name].get("log_tail") and p[name]["status"] != "error":
            lines += ["", "```", p[name]["log_tail"].strip()[-2000:], "```"]
    return "\n".join(lines) + "\n"
