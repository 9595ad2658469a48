"""Judge CPU time models on a held-out `auto_regret.py` run: every option's predicted vs
measured median time, and the regret of the option each model would pick (`plan()`'s
choice under that model) against the fastest measured one.

Each model is a `fit_cpu_model.py` result (its "kernel" and "link"; with "agree_s", the
host's costs measured by `ringmem bench calibrate --host`). The run's own timings are the
only measurements used; nothing here is fitted.

Run: python benchmarks/judge_cpu_model.py RUN.json NAME=FIT.json [NAME=FIT.json ...]
         [--out benchmarks/results/cpu_model_judged]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from auto_regret import _q
from fit_cpu_model import _plan_args, host_fields

import ringmem
from ringmem.links import INTERCONNECTS
from ringmem.plan import DEFAULT_KERNELS, KernelModel


def load_model(path: str, cores: int) -> tuple[KernelModel, Any]:
    d = json.loads(Path(path).read_text())
    # fits made before `cpu_tiles` costed causal pieces as their pairs
    kernel = replace(DEFAULT_KERNELS["cpu"], half=0.0, cores=cores,
                     **{"cpu_tiles": False, **d["kernel"]}, **host_fields(d))
    assert kernel.a2a_s == tuple(d.get("a2a_s") or ()), path
    link = replace(INTERCONNECTS["loopback"], **d["link"])
    return kernel, link


def judge(cases: list[dict[str, Any]], kernel: KernelModel, link: Any) -> dict[str, Any]:
    errs, regrets, ties, total = [], [], 0, 0.0
    for c in cases:
        q, kv, kw = _plan_args(c["case"])
        p = ringmem.plan(q, kv, interconnect=link, kernel=kernel, ulysses="auto", **kw)
        med, iqr = c["median_s"], c["iqr_s"]
        fastest = min(p.schedules, key=lambda n: med[n])
        errs += [p.schedules[n].time_s / med[n] - 1 for n in p.schedules]
        regrets.append(med[p.choice] / med[fastest] - 1)
        ties += med[p.choice] - med[fastest] <= max(iqr[p.choice], iqr[fastest])
        total += med[p.choice]
    absolute = [abs(e) for e in errs]
    return {"rows": len(errs), "within_10pct": sum(e <= 0.10 for e in absolute),
            "median_abs_error": _q(absolute, 0.5), "p90_abs_error": _q(absolute, 0.9),
            "median_signed_error": _q(errs, 0.5),
            "regret": {"median": _q(regrets, 0.5), "p90": _q(regrets, 0.9),
                       "max": max(regrets), "mean": statistics.mean(regrets)},
            "choice_fastest_or_tie": ties, "configs": len(cases), "total_s": total}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("models", nargs="+", metavar="NAME=FIT.json")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    run = json.loads(Path(a.run).read_text())
    cores = run["meta"]["machine"]["cpu_count"]
    res = {"run": a.run, "seed": run["meta"]["seed"], "commit": run["meta"]["commit"],
           "models": {}}
    lines = [f"# CPU models judged on `{a.run}` (seed {res['seed']}, not fitted on)", "",
             "| model | rows within 10% | median abs err | p90 abs err | median signed | "
             "regret median | p90 | max | mean | fastest or tie | total s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for spec in a.models:
        name, _, path = spec.partition("=")
        r = judge(run["cases"], *load_model(path, cores))
        res["models"][name] = {"fit": path, **r}
        g = r["regret"]
        lines.append(f"| {name} | {r['within_10pct']}/{r['rows']} | "
                     f"{r['median_abs_error']:.1%} | {r['p90_abs_error']:.1%} | "
                     f"{r['median_signed_error']:+.1%} | {g['median']:.1%} | {g['p90']:.1%} "
                     f"| {g['max']:.1%} | {g['mean']:.1%} | {r['choice_fastest_or_tie']}/"
                     f"{r['configs']} | {r['total_s']:.3f} |")
    print("\n".join(lines))
    if a.out:
        Path(a.out).with_suffix(".json").write_text(json.dumps(res, indent=1))
        Path(a.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
