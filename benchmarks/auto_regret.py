"""`auto` judged on configs it was not tuned on: the regret of schedule="auto",
ulysses="auto" against every fixed choice, on CPU/gloo.

A seeded generator draws the configs (worlds 2-4, shapes, GQA ratios, causal, sliding
windows, packed documents, non-causal, decode-shaped; forward or forward + backward). For
each config every option `ringmem.plan` lists, and `auto` itself, is timed in interleaved
rounds: each round runs every option once, the order rotated per round, and round r runs
for every config of a world before round r + 1 does (a slow spell of this shared machine
then falls on every config alike; `--per-config`: one config's rounds together, as
before). A sample is as many calls back to back as last `--sample-s` seconds, its time
per call the slowest rank's wall time over them divided by their number: single calls of
10-30 ms reproduced within 10% from one run to the next in under half the rows. Regret
of a policy on a config: the median time of the option it picks over the fastest
option's, minus one. A row is a tie where the two medians differ by less than the larger
of their interquartile ranges (noise).

Run:   python benchmarks/auto_regret.py [--seed 1] [--configs 30] [--rounds 5]
           [--sample-s 0.2] [--per-config]
           [--out benchmarks/results/auto_regret]
(it launches one torchrun per world size, `--worker` mode, and writes .md/.json/.png)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
LAYOUT = "zigzag"
PHASES = ("fwd", "fwd+bwd")
FLOP_CAP = 4e9  # forward FLOPs per rank: keeps one config under ~30 s on 2 cores


@dataclass(frozen=True)
class Case:
    id: int
    world: int
    seq: int  # global tokens (of K/V for the decode shape)
    hq: int
    hkv: int
    dim: int
    mask: str  # "causal", "window", "docs", "full" (non-causal) or "decode"
    phase: str  # "fwd" or "fwd+bwd"
    window: tuple[int, int] = (-1, -1)
    docs: tuple[int, ...] = field(default=())  # cu_seqlens over the global sequence

    @property
    def causal(self) -> bool:
        return self.mask not in ("full", "decode")

    def describe(self) -> str:
        extra = {"window": f" window {self.window[0]}", "docs": f" docs {list(self.docs)}",
                 "decode": " decode (1 query / rank)"}.get(self.mask, "")
        return (f"w{self.world} S={self.seq} {self.hq}/{self.hkv}h d{self.dim} "
                f"{self.mask}{extra} {self.phase}")


def fwd_flops(c: Case) -> float:
    rows = 1 if c.mask == "decode" else c.seq // c.world
    frac = 0.5 if c.causal else 1.0
    return 4.0 * rows * c.seq * frac * c.hq * c.dim


def generate(seed: int, n: int) -> list[Case]:
    """`n` configs drawn with `seed` (the same on every machine: Python's own RNG)."""
    rng = random.Random(seed)
    out: list[Case] = []
    while len(out) < n:
        world = rng.choice((2, 3, 4))
        mask = rng.choice(("causal", "causal", "window", "docs", "full", "decode"))
        hq = rng.choice((4, 8, 16))
        hkv = rng.choice([h for h in (hq, hq // 2, hq // 4, 1) if h >= 1])
        dim = rng.choice((32, 64))
        if mask == "decode":
            seq = world * rng.choice((4096, 8192, 16384))
        else:
            seq = 2 * world * rng.choice((128, 256, 512, 1024))
        phase = "fwd" if mask == "decode" else rng.choice(PHASES)
        window, docs = (-1, -1), ()
        if mask == "window":
            window = (rng.choice((seq // 16, seq // 8, seq // 4)), 0)
        if mask == "docs":
            cuts = sorted(rng.sample(range(1, seq), rng.randint(1, 4)))
            docs = (0, *cuts, seq)
        c = Case(len(out), world, seq, hq, hkv, dim, mask, phase, window, docs)
        if fwd_flops(c) <= FLOP_CAP:
            out.append(c)
    return out


# ------------------------------------------------------------------ worker (torchrun)

def sample_order(configs: int, rounds: int, per_config: bool) -> list[tuple[int, int]]:
    """(config, round) in the order they are timed: round r of every config (the configs'
    order rotated per round), then round r + 1, so a slow spell of the machine falls on
    every config alike; per_config: one config's rounds, then the next config's."""
    if per_config:
        return [(i, r) for i in range(configs) for r in range(rounds)]
    return [(i, r) for r in range(rounds)
            for i in [*range(r % configs, configs), *range(r % configs)]]


def _worker(cases_file: str, out_file: str, rounds: int, sample_s: float,
            per_config: bool) -> None:
    import torch
    import torch.distributed as dist

    import ringmem
    from ringmem.plan import parse_option
    from ringmem.sim.host import rank_times

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cases = [Case(**{**c, "window": tuple(c["window"]), "docs": tuple(c["docs"])})
             for c in json.loads(Path(cases_file).read_text()) if c["world"] == world]

    def setup(c: Case) -> tuple[Any, Any]:
        """(the plan of `c`, a call running one option of it)."""
        g = torch.Generator().manual_seed(c.id)
        k, v = (torch.randn((1, c.seq, c.hkv, c.dim), generator=g) for _ in range(2))
        k, v = (ringmem.shard(t, layout=LAYOUT) for t in (k, v))
        if c.mask == "decode":
            gr = torch.Generator().manual_seed(1000 * c.id + rank)
            q = torch.randn((1, 1, c.hq, c.dim), generator=gr)
            dout = torch.randn(q.shape, generator=gr)
        else:
            q, dout = (ringmem.shard(torch.randn((1, c.seq, c.hq, c.dim), generator=g),
                                     layout=LAYOUT) for _ in range(2))
        kw: dict[str, Any] = dict(causal=c.causal, layout=LAYOUT, window=c.window,
                                  cu_seqlens=list(c.docs) if c.docs else None)
        bwd = c.phase == "fwd+bwd"
        p = ringmem.plan(tuple(q.shape), tuple(k.shape), world=world, dtype=q.dtype,
                         device_type="cpu", backward=bwd, ulysses="auto", **kw)

        def call(option: str) -> None:
            u, s = ("auto", "auto") if option == "auto" else parse_option(option, world)
            if not bwd:
                with torch.no_grad():
                    ringmem.ring_attention(q, k, v, schedule=s, ulysses=u, **kw)
                return
            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            ringmem.ring_attention(*leaves, schedule=s, ulysses=u, **kw).backward(dout)
        return p, call

    def timed(call: Any, n: str, reps: int) -> float:
        """One sample: `reps` calls back to back, the slowest rank's wall time / reps."""
        return rank_times(lambda: [call(n) for _ in range(reps)], 1, warmup=False)[0] / reps

    runs = []
    for c in cases:
        p, call = setup(c)
        names = [*p.schedules, "auto"]
        for n in names:  # warm-up: kernels, buffers, the plan cache
            call(n)
        # calls per sample: enough for sample_s (one probe call each; every rank the same)
        probe = [timed(call, n, 1) for n in names]
        reps = {n: max(1, math.ceil(sample_s / max(t, 1e-6))) for n, t in zip(names, probe)}
        runs.append((c, p, call, names, reps, {n: [] for n in names}))
    order = sample_order(len(runs), rounds, per_config)
    t_start = time.perf_counter()
    for done, (i, r) in enumerate(order):
        c, p, call, names, reps, times = runs[i]
        for n in names[r % len(names):] + names[:r % len(names)]:
            times[n].append(timed(call, n, reps[n]))
        if rank == 0 and (done + 1) % len(runs) == 0:
            print(f"[w{world}] {(done + 1) // len(runs)}/{rounds} rounds' worth of samples, "
                  f"{time.perf_counter() - t_start:.1f} s", flush=True)
    results = [{"case": asdict(c), "choice": p.choice, "times": times, "reps": reps,
                "predicted_s": {n: e.time_s for n, e in p.schedules.items()}}
               for c, p, call, names, reps, times in runs]
    if rank == 0:
        Path(out_file).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()
    # no interpreter finalization: a native destructor at exit intermittently aborts
    # (SIGABRT) after the work is done, which torchrun would report as a failed run
    sys.stdout.flush()
    os._exit(0)


# ------------------------------------------------------------------ analysis

def _q(xs: list[float], f: float) -> float:
    xs = sorted(xs)
    i = f * (len(xs) - 1)
    lo = int(i)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (i - lo)


def _fixed(policy: str, options: list[str]) -> str | None:
    """The option a fixed policy runs (None: not available for this config)."""
    if policy in ("kv", "q", "allgather"):
        return policy if policy in options else None
    if policy == "ulysses":  # the most Ulysses the heads allow, its ring on kv
        uly = [o for o in options if o.startswith("ulysses") and not o.endswith(("+q",
                                                                                  "+allgather"))]
        if not uly:
            return None
        return "ulysses" if "ulysses" in uly else max(
            uly, key=lambda o: int(o[7:].split("+")[0]))
    raise ValueError(policy)


POLICIES = ("auto", "kv", "q", "allgather", "ulysses", "random")


def analyse(rows: list[dict[str, Any]]) -> dict[str, Any]:
    per_case = []
    for row in rows:
        t = row["times"]
        options = list(row["predicted_s"])
        med = {n: statistics.median(v) for n, v in t.items()}
        iqr = {n: _q(v, 0.75) - _q(v, 0.25) for n, v in t.items()}
        fastest = min(options, key=lambda n: med[n])
        picks = {"auto": row["choice"]}
        for pol in ("kv", "q", "allgather", "ulysses"):
            # where the heads allow no Ulysses, that policy runs kv (always there)
            picks[pol] = _fixed(pol, options) or "kv"
        regret = {pol: med[o] / med[fastest] - 1 for pol, o in picks.items()}
        regret["random"] = statistics.mean(med[o] / med[fastest] - 1 for o in options)
        total = {pol: med[o] for pol, o in picks.items()}
        total["random"] = statistics.mean(med[o] for o in options)
        tie = med[row["choice"]] - med[fastest] <= max(iqr[row["choice"]], iqr[fastest])
        per_case.append({"case": row["case"], "fastest": fastest, "choice": row["choice"],
                         "median_s": med, "iqr_s": iqr, "regret": regret, "time": total,
                         "tie": tie, "auto_measured_s": med["auto"],
                         "predicted_s": row["predicted_s"]})
    summary = {}
    for pol in POLICIES:
        rs = [c["regret"][pol] for c in per_case]
        summary[pol] = {"median": _q(rs, 0.5), "p90": _q(rs, 0.9), "max": max(rs),
                        "mean": statistics.mean(rs),
                        "total_s": sum(c["time"][pol] for c in per_case)}
    return {"cases": per_case, "summary": summary, "accuracy": accuracy(per_case)}


def accuracy(cases: list[dict[str, Any]]) -> dict[str, float]:
    """Every option's predicted vs measured median time: rows within 10%, the median and
    90th percentile of |error|, the median signed error (+: predicted too slow)."""
    errs = [c["predicted_s"][n] / c["median_s"][n] - 1 for c in cases
            for n in c["predicted_s"]]
    absolute = [abs(e) for e in errs]
    return {"rows": len(errs), "within_10pct": sum(e <= 0.10 for e in absolute),
            "median_abs_error": _q(absolute, 0.5), "p90_abs_error": _q(absolute, 0.9),
            "median_signed_error": _q(errs, 0.5)}


def report(res: dict[str, Any], meta: dict[str, Any], out: Path) -> None:
    s, cases = res["summary"], res["cases"]
    lines = [f"# `auto` on held-out configs (seed {meta['seed']}), CPU / gloo", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "## Regret by policy", "",
              "regret = T(the policy's option) / T(fastest option) - 1, medians over the "
              f"rounds; {len(cases)} configs; random = the mean over the options.", "",
              "| policy | median | p90 | max | mean | total time of the configs (s) |",
              "| --- | --- | --- | --- | --- | --- |"]
    for pol in POLICIES:
        r = s[pol]
        lines.append(f"| {pol} | {r['median']:.1%} | {r['p90']:.1%} | {r['max']:.1%} | "
                     f"{r['mean']:.1%} | {r['total_s']:.3f} |")
    acc = res["accuracy"]
    lines += ["", "## Predicted vs measured (every option of every config)", "",
              f"{acc['within_10pct']}/{acc['rows']} within 10%; median |error| "
              f"{acc['median_abs_error']:.1%}, p90 {acc['p90_abs_error']:.1%} "
              "(predicted: `ringmem.plan`, device_type='cpu', the defaults of this commit)."]
    best = sum(c["choice"] == c["fastest"] for c in cases)
    ties = sum(c["tie"] and c["choice"] != c["fastest"] for c in cases)
    lines += ["", f"auto chose the measured-fastest option in {best}/{len(cases)} configs; "
              f"of the other {len(cases) - best}, {ties} are ties (the difference to the "
              "fastest is less than the larger interquartile range of the two).", "",
              "## Every config", "",
              "| # | config | options | fastest | auto's choice | regret | tie | "
              "median s per option [IQR] (predicted ms) |", "|" + " --- |" * 8]
    for c in cases:
        cs = c["case"]
        desc = Case(**{**cs, "window": tuple(cs["window"]), "docs": tuple(cs["docs"])})
        cells = "<br>".join(
            f"{n}: {c['median_s'][n]:.4f} [{c['iqr_s'][n]:.4f}] "
            f"({c['predicted_s'][n] * 1e3:.1f})" for n in c["predicted_s"])
        lines.append(f"| {cs['id']} | {desc.describe()} | {len(c['predicted_s'])} | "
                     f"{c['fastest']} | {c['choice']} | {c['regret']['auto']:.1%} | "
                     f"{'tie' if c['tie'] else ''} | {cells} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, **res}, indent=1))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for pol in POLICIES:
        rs = sorted(c["regret"][pol] * 100 for c in cases)
        ax.step(rs, [(i + 1) / len(rs) for i in range(len(rs))], where="post", label=pol)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("regret: time over the fastest option (%)")
    ax.set_ylabel("fraction of configs")
    ax.set_title(f"auto vs fixed choices, {len(cases)} held-out configs (CPU, gloo)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


# ------------------------------------------------------------------ driver

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--configs", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sample-s", type=float, default=0.2,
                    help="seconds of calls per timed sample (calls back to back, the "
                         "time per call recorded; 0: one call per sample, the protocol "
                         "of runs before 2026-12-07 evening)")
    ap.add_argument("--per-config", action="store_true",
                    help="time one config's rounds together, then the next config's (the "
                         "protocol of seed 7 and before); default: round r of every "
                         "config, then round r + 1")
    ap.add_argument("--out", default=str(HERE / "results" / "auto_regret"))
    ap.add_argument("--worker", nargs=2, metavar=("CASES", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return _worker(a.worker[0], a.worker[1], a.rounds, a.sample_s, a.per_config)
    for name, n in (("--configs", a.configs), ("--rounds", a.rounds)):
        if n < 1:
            raise SystemExit(f"{name} must be >= 1, got {n}")
    if not (math.isfinite(a.sample_s) and a.sample_s >= 0):
        raise SystemExit(f"--sample-s must be a finite number >= 0, got {a.sample_s}")
    cases = generate(a.seed, a.configs)
    t0 = time.time()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        cf = Path(tmp) / "cases.json"
        cf.write_text(json.dumps([asdict(c) for c in cases]))
        for w in sorted({c.world for c in cases}):
            part = Path(tmp) / f"w{w}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={w}", __file__, "--rounds", str(a.rounds),
                   "--sample-s", str(a.sample_s), *(["--per-config"] if a.per_config else []),
                   "--worker", str(cf), str(part)]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            subprocess.run(cmd, check=True, env=env)
            rows += json.loads(part.read_text())
    rows.sort(key=lambda r: r["case"]["id"])
    sys.path.insert(0, str(HERE))
    import torch

    import ringmem

    from _common import git_commit, machine
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "commit": git_commit(), "machine": machine(), "torch": torch.__version__,
            "ringmem": ringmem.__version__, "seed": a.seed, "configs": a.configs,
            "rounds": a.rounds, "seconds per sample": a.sample_s,
            "rounds interleaved across configs": not a.per_config, "dtype": "fp32",
            "layout": LAYOUT, "threads per rank": 1,
            "wall s": round(time.time() - t0, 1),
            "load average at the end": [round(x, 2) for x in os.getloadavg()]}
    res = analyse(rows)
    report(res, meta, Path(a.out))
    s = res["summary"]
    print(f"auto: median regret {s['auto']['median']:.1%}, p90 {s['auto']['p90']:.1%}; "
          f"report: {Path(a.out).with_suffix('.md')}")


if __name__ == "__main__":
    main()
