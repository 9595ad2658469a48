"""Training throughput and activation memory per rank vs context, CP=1 vs CP=2, with and
without activation checkpointing (SmolLM2-135M, CPU, gloo).

Each configuration runs as its own torchrun job (`--worker`): one warm-up step, then timed
steps. Step memory per rank = peak RSS during a step (sampled every 2 ms from /proc) minus
the RSS just before it: the activations and temporaries of that step (parameters, gradients
and optimizer state are allocated by the warm-up and not counted). From a linear fit of step
memory against context per CP degree (intercept: the step's fixed part, gathered parameters
and optimizer temporaries; slope x context: the activations), the activation memory per
rank and the longest context that fits a per-rank cap are derived. Targets: CP=2's
activation memory <= 0.6 x CP=1's at the same context; the longest context under a cap
grows ~linearly with CP.

--layers N keeps the first N decoder layers of SmolLM2 (a CPU-sized stand-in: activation
memory per layer, hence every ratio, is unchanged; times shrink about 30/N-fold).

Run: python benchmarks/train.py [--contexts 2048,4096,8192] [--layers 30]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Peak:
    """Highest RSS seen while the block runs (sampled on a thread)."""

    def __enter__(self) -> "Peak":
        self.start, self.peak, self._stop = rss(), rss(), False
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()
        return self

    def _watch(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, rss())


def worker(a: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from ringmem.train import loop
    from ringmem.train.config import TrainConfig
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo")
    cfg = TrainConfig(model="smollm2-135m", seq_len=a.context, steps=a.steps + 1,
                      max_documents=max(8, 4 * a.context // 1000),
                      activation_checkpointing=a.ac, out_dir="/tmp/ringmem-bench-train")
    if a.layers:  # a shorter stack of the same layers (see the module docstring)
        from ringmem.demo import models
        real_load = models.load

        def load(*args, **kw):
            model, tok = real_load(*args, **kw)
            model.model.layers = model.model.layers[: a.layers]
            model.config.num_hidden_layers = a.layers
            return model, tok
        models.load = load
    run = loop.build(cfg, dist.get_world_size())
    loop.train_step(run)  # warm-up: gradients and optimizer state now exist
    times, mems = [], []
    for _ in range(a.steps):
        dist.barrier()
        with Peak() as p:
            t0 = time.perf_counter()
            rec = loop.train_step(run)
            times.append(time.perf_counter() - t0)
        mems.append(p.peak - p.start)
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, {"time": min(times), "mem": max(mems), "loss": rec["loss"]})
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps({"context": a.context, "cp": dist.get_world_size(),
                                      "ac": a.ac, "ranks": out}), flush=True)
    dist.destroy_process_group()


def launch(context: int, cp: int, ac: bool, a: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={cp}", __file__, "--worker", "--context", str(context),
           "--steps", str(a.steps), "--layers", str(a.layers)] + (["--ac"] if ac else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, a.cores // cp))}
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT ")), None)
    if res.returncode or line is None:
        raise RuntimeError(f"context {context} cp {cp} ac {ac} failed:\n{res.stderr[-3000:]}")
    r = json.loads(line[7:])
    r["tokens_per_s"] = context / max(x["time"] for x in r["ranks"])
    r["mem_mib"] = max(x["mem"] for x in r["ranks"]) / 2**20
    return r


def fit(rows: list[dict]) -> tuple[float, float]:
    """(a, b) of mem = a + b * context by least squares."""
    xs, ys = [r["context"] for r in rows], [r["mem_mib"] for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(
        1e-9, sum((x - mx) ** 2 for x in xs))
    return my - b * mx, b


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--contexts", default="2048,4096,8192")
    p.add_argument("--layers", type=int, default=0, help="keep the first N layers (0: all)")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--ac", action="store_true")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    p.add_argument("--cap-mib", type=float, default=4096.0)
    p.add_argument("--out", default="benchmarks/results/train.md")
    a = p.parse_args()
    if a.worker:
        return worker(a)
    from tqdm import tqdm
    grid = [(c, cp, ac) for ac in (False, True) for cp in (1, 2)
            for c in (int(x) for x in a.contexts.split(","))]
    rows = []
    for c, cp, ac in tqdm(grid, desc="train benchmark"):
        rows.append(launch(c, cp, ac, a))
    report(a, rows)


def report(a: argparse.Namespace, rows: list[dict]) -> None:
    import torch
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import git_commit, machine
    by = {(r["context"], r["cp"], r["ac"]): r for r in rows}
    lines = ["# Context-parallel training: throughput and step memory per rank (CPU)\n",
             f"- date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}, commit "
             f"{git_commit()}", f"- machine: {machine()}",
             f"- versions: python {platform.python_version()}, torch {torch.__version__}",
             f"- model: SmolLM2-135M, {a.layers or 30} decoder layers; fp32; layout "
             f"document; {a.cores} cores shared by the ranks; steps timed: {a.steps}\n",
             "| context | CP | act. ckpt | tokens/s | step memory per rank (MiB) | "
             "vs CP=1 |", "|---|---|---|---|---|---|"]
    ratios = []
    for (c, cp, ac), r in sorted(by.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1])):
        base = by.get((c, 1, ac))
        ratio = r["mem_mib"] / base["mem_mib"] if base else float("nan")
        if cp == 2:
            ratios.append(ratio)
        lines.append(f"| {c} | {cp} | {'on' if ac else 'off'} | {r['tokens_per_s']:.1f} | "
                     f"{r['mem_mib']:.0f} | {ratio:.2f} |")
    longest, slopes = {}, {}
    for ac in (False, True):
        for cp in (1, 2):
            pts = [r for r in rows if r["cp"] == cp and r["ac"] == ac]
            i, s = fit(pts)
            slopes[(cp, ac)] = (i, s)
            longest[(cp, ac)] = (a.cap_mib - i) / s if s > 0 else float("inf")
    act = {ac: slopes[(2, ac)][1] / slopes[(1, ac)][1] for ac in (False, True)}
    lines += ["\n## Derived\n",
              "- fit step memory = fixed + per-token x context (MiB, MiB per 1K tokens): " +
              ", ".join(f"CP={cp} AC {'on' if ac else 'off'}: {i:.0f} + {1000 * s:.1f}/1K"
                        for (cp, ac), (i, s) in slopes.items()),
              f"- activation memory per rank CP=2 / CP=1 (ratio of the per-token slopes): "
              f"AC off {act[False]:.2f}, AC on {act[True]:.2f} (target <= 0.60): "
              f"{'PASS' if max(act.values()) <= 0.6 else 'FAIL'}",
              f"- longest context under a {a.cap_mib:.0f} MiB per-rank step-memory cap "
              f"(linear fit per CP): " + ", ".join(
                  f"CP={cp} AC {'on' if ac else 'off'}: {v:,.0f}" for (cp, ac), v in
                  longest.items()),
              f"- growth CP=1 -> CP=2: AC off {longest[(2, False)] / longest[(1, False)]:.2f}x,"
              f" AC on {longest[(2, True)] / longest[(1, True)]:.2f}x (target ~2x)",
              f"- whole step memory CP=2 / CP=1 at equal context (fixed part included): "
              f"max {max(ratios):.2f}"]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "config": vars(a)},
                                                   indent=2) + "\n")
    plot(rows, out.with_suffix(".png"))
    print("\n".join(lines))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for ac in (False, True):
        for cp, m in ((1, "o"), (2, "s")):
            pts = sorted((r for r in rows if r["cp"] == cp and r["ac"] == ac),
                         key=lambda r: r["context"])
            lab = f"CP={cp}, AC {'on' if ac else 'off'}"
            ax1.plot([r["context"] for r in pts], [r["mem_mib"] for r in pts], marker=m,
                     label=lab)
            ax2.plot([r["context"] for r in pts], [r["tokens_per_s"] for r in pts],
                     marker=m, label=lab)
    ax1.set_xlabel("context (tokens)")
    ax1.set_ylabel("step memory per rank (MiB)")
    ax2.set_xlabel("context (tokens)")
    ax2.set_ylabel("tokens/s")
    ax1.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
