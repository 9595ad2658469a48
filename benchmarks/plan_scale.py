"""How long `plan()` takes to predict every option for rings of 8 to 1024 ranks.

Each measurement runs in a fresh Python process (cold caches), timing one `plan()` call
with ulysses="auto" and schedule="auto": every Ulysses degree dividing the world and the
32 query heads, times every ring schedule (18 options at 1024 ranks). Shapes per rank:
8K tokens, 32 q / 8 kv heads, d=128, bf16, zigzag. Configs: causal forward, causal
forward + backward, a 4K causal sliding window, and 8 GPUs per node (NVSwitch) with
InfiniBand between nodes. `--baseline DIR` times another checkout (e.g. a `git worktree`
of an older commit) the same way, up to `--baseline-max` ranks.

Run: python benchmarks/plan_scale.py [--quick] [--repeats 3] [--baseline DIR]
Report: benchmarks/results/plan_scale.{md,json,png}
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import git_commit, machine  # noqa: E402

CONFIGS = {
    "causal fwd": {},
    "causal fwd+bwd": {"backward": True},
    "window 4096 fwd": {"window": (4096, 0)},
    "8 per node + IB fwd": {"interconnect": "nvswitch", "inter_node": "ib",
                            "gpus_per_node": 8},
}
SNIPPET = """
import json, sys, time
import torch
from ringmem.plan import plan
kw = json.loads(sys.argv[1])
world = kw.pop("world")
if "window" in kw:
    kw["window"] = tuple(kw["window"])
t = time.perf_counter()
p = plan((1, 8192, 32, 128), (1, 8192, 8, 128), world=world, dtype=torch.bfloat16,
         ulysses="auto", schedule="auto", **kw)
print(json.dumps({"s": time.perf_counter() - t, "options": len(p.schedules),
                  "choice": p.choice}))
"""


def measure(root: Path, world: int, kw: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", SNIPPET, json.dumps({"world": world, **kw})],
                         capture_output=True, text=True, env=env, timeout=timeout,
                         cwd=root, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(root: Path, worlds: list[int], repeats: int, configs: list[str], timeout: float,
        label: str) -> list[dict[str, Any]]:
    from tqdm import tqdm
    rows = []
    jobs = [(c, w) for c in configs for w in worlds]
    stopped: set[str] = set()  # configs that ran out of time at a smaller world
    for c, w in tqdm(jobs, desc=f"plan() {label}", file=sys.stderr):
        if c in stopped:
            continue
        try:
            got = [measure(root, w, CONFIGS[c], timeout) for _ in range(repeats)]
        except subprocess.TimeoutExpired:
            rows.append({"config": c, "world": w, "timed_out_s": timeout})
            stopped.add(c)
            continue
        s = [g["s"] for g in got]
        rows.append({"config": c, "world": w, "median_s": statistics.median(s),
                     "min_s": min(s), "max_s": max(s), "runs": s,
                     "options": got[0]["options"], "choice": got[0]["choice"]})
    return rows


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for key, style in (("rows", "-"), ("baseline", "--")):
        for c in dict.fromkeys(r["config"] for r in res[key]):
            pts = [(r["world"], r["median_s"]) for r in res[key]
                   if r["config"] == c and "median_s" in r]
            if pts:
                label = c if key == "rows" else f"{c} ({res['baseline_commit']})"
                ax.plot(*zip(*pts), style, marker="o", label=label)
    ax.axhline(10, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("ranks")
    ax.set_ylabel("plan() seconds, every option (median)")
    ax.set_title("plan() time vs ranks (8K tokens per rank)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = ["# plan() at cluster scale", "",
             f"- date: {res['date']}; commit {res['commit']}; python {res['python']}, "
             f"torch {res['torch']}",
             f"- machine: {m['platform']}, {m['cpu']}, {m['cpu_count']} cores",
             "- one `plan()` call per fresh process (cold caches), ulysses='auto', "
             "schedule='auto' (every option); per rank [1, 8192, 32 q / 8 kv heads, 128], "
             f"bf16, zigzag; {res['repeats']} runs each (median, min-max)",
             "- target (issue 29): every option at 1024 ranks in <= 10 s", "",
             "![plan_scale](plan_scale.png)", "",
             "| config | ranks | options | choice | median s | min-max s |",
             "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if "median_s" not in r:
            lines.append(f"| {r['config']} | {r['world']} | | | > {r['timed_out_s']:.0f} | |")
            continue
        lines.append(f"| {r['config']} | {r['world']} | {r['options']} | {r['choice']} | "
                     f"{r['median_s']:.2f} | {r['min_s']:.2f}-{r['max_s']:.2f} |")
    if res["baseline"]:
        lines += ["", f"Before (commit {res['baseline_commit']}, block by block in Python; "
                  "same machine and method):", "",
                  "| config | ranks | median s | min-max s |", "|---|---|---|---|"]
        for r in res["baseline"]:
            if "median_s" not in r:
                lines.append(f"| {r['config']} | {r['world']} | > {r['timed_out_s']:.0f} "
                             f"(stopped; larger rings not tried) | |")
                continue
            lines.append(f"| {r['config']} | {r['world']} | {r['median_s']:.2f} | "
                         f"{r['min_s']:.2f}-{r['max_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="8-64 ranks, one run each")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--baseline", default=None, help="another checkout to time the same way")
    p.add_argument("--baseline-max", type=int, default=128)
    p.add_argument("--baseline-repeats", type=int, default=1)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per call")
    p.add_argument("--out", default=str(HERE / "results" / "plan_scale"))
    a = p.parse_args()
    if a.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {a.repeats}")
    top = 64 if a.quick else 1024
    worlds = [2 ** i for i in range(3, 11) if 2 ** i <= top]
    repeats = 1 if a.quick else a.repeats
    import torch
    res: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(), "machine": machine(), "python": sys.version.split()[0],
        "torch": torch.__version__, "repeats": repeats,
        "rows": run(HERE.parent, worlds, repeats, list(CONFIGS), a.timeout, "this checkout"),
        "baseline": [], "baseline_commit": None}
    if a.baseline:
        base = Path(a.baseline).resolve()
        res["baseline_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
            cwd=base).stdout.strip() or str(base)
        res["baseline"] = run(base, [w for w in worlds if w <= a.baseline_max],
                              a.baseline_repeats, ["causal fwd", "window 4096 fwd"],
                              a.timeout, "baseline")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    plot(res, out.with_suffix(".png"))
    out.with_suffix(".md").write_text(report(res))
    print(report(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
