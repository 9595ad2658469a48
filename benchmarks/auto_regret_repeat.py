"""Repeated runs of `auto_regret.py` on one seed: how far the measurements themselves move
between runs (the ceiling any prediction can reach), beside each run's prediction accuracy
and `auto`'s regret.

A prediction is judged against one run's medians; the same configs measured again minutes
later differ too. If only n% of the rows of one run lie within 10% of another run's, no
model can put much more than n% of its predictions within 10% of a run.

Run: python benchmarks/auto_regret_repeat.py RUN1.json RUN2.json [...] [--out PATH]
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from auto_regret import accuracy  # noqa: E402


def _rows(run: dict[str, Any]) -> dict[tuple[int, str], float]:
    return {(c["case"]["id"], o): t for c in run["cases"] for o, t in c["median_s"].items()
            if o != "auto"}


def agreement(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """Run b's medians against run a's, row by row (the same config and option)."""
    ra, rb = _rows(a), _rows(b)
    d = [rb[k] / ra[k] - 1 for k in ra if k in rb]
    return {"rows": len(d), "within_10pct": sum(abs(x) <= 0.1 for x in d),
            "median_abs_change": statistics.median(abs(x) for x in d),
            "median_signed_change": statistics.median(d)}


def report(runs: list[dict[str, Any]], names: list[str]) -> tuple[str, dict[str, Any]]:
    seeds = {r["meta"]["seed"] for r in runs}
    if len(seeds) != 1:
        raise SystemExit(f"the runs must share one seed, got {sorted(seeds)}")
    per_run = []
    for n, r in zip(names, runs):
        s = r["summary"]
        per_run.append({"run": n, "date": r["meta"]["date"], "commit": r["meta"]["commit"],
                        "prediction": accuracy(r["cases"]),
                        "auto": {k: s["auto"][k] for k in ("median", "p90", "total_s")},
                        "best_fixed_total_s": min(v["total_s"] for p, v in s.items()
                                                  if p not in ("auto", "random"))})
    pairs = [{"a": names[i], "b": names[j], **agreement(runs[i], runs[j])}
             for i, j in itertools.combinations(range(len(runs)), 2)]
    lines = [f"# `auto_regret.py` repeated: seed {seeds.pop()}, {len(runs)} runs", "",
             "## Each run", "",
             "| run | date | commit | predictions within 10% | median abs error | "
             "median signed error | auto median regret | auto p90 | auto total s | "
             "best fixed total s |", "|" + " --- |" * 10]
    for p in per_run:
        a, q = p["auto"], p["prediction"]
        lines.append(f"| {p['run']} | {p['date']} | {p['commit']} | {q['within_10pct']}/"
                     f"{q['rows']} | {100 * q['median_abs_error']:.1f}% | "
                     f"{100 * q['median_signed_error']:+.1f}% | {100 * a['median']:.1f}% | "
                     f"{100 * a['p90']:.1f}% | {a['total_s']:.3f} | "
                     f"{p['best_fixed_total_s']:.3f} |")
    lines += ["", "## Run against run (the measurement's own reproducibility)", "",
              "Each (config, option) median of run b over run a's.", "",
              "| a | b | within 10% | median abs change | median signed change |",
              "| --- | --- | --- | --- | --- |"]
    for p in pairs:
        lines.append(f"| {p['a']} | {p['b']} | {p['within_10pct']}/{p['rows']} | "
                     f"{100 * p['median_abs_change']:.1f}% | "
                     f"{100 * p['median_signed_change']:+.1f}% |")
    return "\n".join(lines) + "\n", {"runs": per_run, "pairs": pairs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="auto_regret.py .json files of one seed")
    ap.add_argument("--out", default=str(HERE / "results" / "auto_regret_repeat"))
    a = ap.parse_args()
    if len(a.runs) < 2:
        raise SystemExit(f"give at least 2 runs, got {len(a.runs)}")
    runs = [json.loads(Path(f).read_text()) for f in a.runs]
    md, data = report(runs, [Path(f).stem for f in a.runs])
    Path(a.out).with_suffix(".md").write_text(md)
    Path(a.out).with_suffix(".json").write_text(json.dumps(data, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
