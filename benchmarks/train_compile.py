"""Compiled vs eager training steps: `ringmem train` on configs/train_smoke.toml with
`--compile` (each decoder layer through torch.compile / inductor, ring attention a custom
op) against the same job without it.

The smoke config's layout is "document"; compiling needs "zigzag" (the compiled attention
reads the packed documents off the position ids), so both runs use `--layout zigzag`.
Runs alternate (eager, compiled, eager, compiled, ...); each logs per-step seconds
(rank 0's wall time of the whole step, which ends in an all-reduce). Step 1 of a compiled
run includes the compilation and is reported apart; the rest are the steady state.

Run: python benchmarks/train_compile.py [--runs 2] [--steps 8] [--nproc 2]
Report: benchmarks/results/train_compile.{md,json}
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _common import git_commit, machine  # noqa: E402


def one(compiled: bool, steps: int, nproc: int, out: Path) -> list[dict[str, Any]]:
    cmd = [sys.executable, "-m", "ringmem.cli", "train", "--nproc", str(nproc), "--config",
           "configs/train_smoke.toml", "--layout", "zigzag", "--steps", str(steps),
           "--out-dir", str(out)] + (["--compile"] if compiled else [])
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True, timeout=1800)
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if x.strip()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=2, help="runs of each, alternating")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "results" / "train_compile"))
    a = p.parse_args()
    if a.runs < 1 or a.steps < 2:
        raise ValueError(f"need --runs >= 1 and --steps >= 2, got {a.runs}, {a.steps}")
    from tqdm import tqdm
    runs: dict[str, list[list[dict[str, Any]]]] = {"eager": [], "compiled": []}
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(i, name) for i in range(a.runs) for name in runs]
        for i, name in tqdm(jobs, desc="train runs", file=sys.stderr):
            runs[name].append(one(name == "compiled", a.steps, a.nproc,
                                  Path(tmp) / f"{name}{i}"))
    import torch
    res: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(), "machine": machine(), "python": sys.version.split()[0],
        "torch": torch.__version__, "nproc": a.nproc, "steps": a.steps,
        "config": "configs/train_smoke.toml, layout zigzag", "runs": runs}
    summary = {}
    for name, rs in runs.items():
        steady = [r["step_s"] for run in rs for r in run[1:]]
        summary[name] = {"first_s": [run[0]["step_s"] for run in rs],
                         "median_s": statistics.median(steady), "min_s": min(steady),
                         "max_s": max(steady),
                         "run_medians_s": [statistics.median(r["step_s"] for r in run[1:])
                                           for run in rs],
                         "losses": [[round(r["loss"], 5) for r in run] for run in rs]}
    res["summary"] = summary
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    e, c = summary["eager"], summary["compiled"]
    m = res["machine"]
    lines = ["# Compiled vs eager training steps", "",
             f"- date: {res['date']}; commit {res['commit']}; python {res['python']}, "
             f"torch {res['torch']}",
             f"- machine: {m['platform']}, {m['cpu']}, {m['cpu_count']} cores; "
             f"{a.nproc} gloo ranks",
             f"- job: `ringmem train --config configs/train_smoke.toml --layout zigzag "
             f"--steps {a.steps}` with and without `--compile`; {a.runs} runs of each, "
             "alternating; steady state = steps 2 on (no target: reported)", "",
             "| | steady step s (median) | min-max | per-run medians | first step s "
             "(compiles) |", "|---|---|---|---|---|"]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['median_s']:.3f} | {s['min_s']:.3f}-{s['max_s']:.3f} | "
                     f"{', '.join(f'{x:.3f}' for x in s['run_medians_s'])} | "
                     f"{', '.join(f'{x:.1f}' for x in s['first_s'])} |")
    lines += ["", f"Compiled / eager steady step: {c['median_s'] / e['median_s']:.2f}x. A "
              "compiled run's first step includes compiling, from inductor's on-disk cache "
              "once any run on this machine has filled it (so later runs' first steps are "
              "shorter).",
              "", "Losses per step (each run; compiled and eager should agree to fp32 "
              "noise):", ""]
    for name, s in summary.items():
        for i, ls in enumerate(s["losses"]):
            lines.append(f"- {name} run {i + 1}: {ls}")
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
