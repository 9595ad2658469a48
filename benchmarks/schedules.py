"""Parallel-option benchmark on CPU/gloo: every option ringmem has for the world size (ring
schedules "kv", "q" (TokenRing), "allgather"; Ulysses degrees x ring schedule, pure Ulysses)
vs schedule="auto", ulysses="auto"; then the plan's predicted ranking for GPU clusters.

Run: torchrun --standalone --nproc-per-node 2 benchmarks/schedules.py [--repeats 5]
     [--out benchmarks/results/schedules.md] [--quick]
     torchrun --standalone --nproc-per-node 4 benchmarks/schedules.py \
         --out benchmarks/results/schedules_w4.md
Exit status 1 only if measured bytes differ from ringmem.plan or two options disagree.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor

import ringmem
from ringmem.links import Interconnect
from ringmem.plan import parse_option

from _common import git_commit, machine

PHASES = ("fwd", "fwd+bwd")
LAYOUT, DTYPE, TOL, SLACK = "zigzag", torch.float32, 1e-3, 1.05


@dataclass(frozen=True)
class Config:
    name: str
    seq: int  # global sequence length (of K/V for the decode shape)
    hq: int
    hkv: int
    dim: int = 64
    decode: bool = False  # q: 1 token per rank, generated per rank, not sharded; non-causal


CONFIGS = (Config("MHA prefill", 8192, 8, 8), Config("GQA 4:1 prefill", 8192, 8, 2),
           Config("GQA 8:1 prefill, wide", 2048, 32, 4), Config("MHA prefill, short wide",
           2048, 32, 32), Config("decode-shaped", 65536, 8, 8, decode=True))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default="benchmarks/results/schedules.md")
    p.add_argument("--quick", action="store_true", help="sequence lengths / 8, repeats=1")
    a = p.parse_args()
    a.repeats = 1 if a.quick else a.repeats
    return a


def make_inputs(cfg: Config, rank: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """This rank's q, k, v, dout (fixed seeds; sharded from full tensors except decode q)."""
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn((1, cfg.seq, cfg.hkv, cfg.dim), generator=g) for _ in range(2))
    k, v = (ringmem.shard(t, layout=LAYOUT) for t in (k, v))
    if cfg.decode:
        gr = torch.Generator().manual_seed(1000 + rank)
        q = torch.randn((1, 1, cfg.hq, cfg.dim), generator=gr)
        return q, k, v, torch.randn(q.shape, generator=gr)
    q, dout = (torch.randn((1, cfg.seq, cfg.hq, cfg.dim), generator=g) for _ in range(2))
    return ringmem.shard(q, layout=LAYOUT), k, v, ringmem.shard(dout, layout=LAYOUT)


def option_kw(option: str, world: int) -> dict[str, Any]:
    """ring_attention keywords of an option name ("auto": the cost model picks both)."""
    if option == "auto":
        return {"schedule": "auto", "ulysses": "auto"}
    u, sched = parse_option(option, world)
    return {"schedule": sched, "ulysses": u}


def runner(cfg: Config, x: tuple[Tensor, ...], option: str, phase: str,
           world: int) -> Callable[[ringmem.CommStats | None], tuple[Tensor, list[Tensor]]]:
    """A call of one phase: returns (out, grads of q, k, v; empty for fwd)."""
    q, k, v, dout = x
    leaves = [] if phase == "fwd" else [t.detach().clone().requires_grad_() for t in (q, k, v)]

    def run(stats: ringmem.CommStats | None = None) -> tuple[Tensor, list[Tensor]]:
        kw = dict(causal=not cfg.decode, layout=LAYOUT, stats=stats, **option_kw(option, world))
        if phase == "fwd":
            with torch.no_grad():
                return ringmem.ring_attention(q, k, v, **kw), []
        for t in leaves:
            t.grad = None
        out = ringmem.ring_attention(*leaves, **kw)
        out.backward(dout)
        return out.detach(), [t.grad for t in leaves]
    return run


def timed(fns: dict[str, Callable[..., Any]], repeats: int
          ) -> tuple[dict[str, list[float]], dict[str, ringmem.CommStats]]:
    """Warm-up of each call (recording its bytes), then `repeats` rounds that run every
    call once in turn (so drift hits all alike), each timed as the slowest rank's."""
    warm = {}
    for name, fn in fns.items():
        warm[name] = ringmem.CommStats()
        fn(warm[name])
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            times[name].append(dt.item())
    return times, warm


def signature(stats: ringmem.CommStats, phase: str) -> tuple[tuple, tuple[int, int]]:
    """(ring steps with traffic as (step, sent, recv), all-to-all (sent, recv)) of a phase."""
    steps = stats.per_step(phase, ring=True)
    return (tuple((i, *x) for i, x in sorted(steps.items()) if x != (0, 0)),
            stats.total(phase, "a2a"))


def planned(est: ringmem.plan.Estimate, phase: str, rank: int) -> tuple[tuple, tuple[int, int]]:
    return (tuple((i, *x) for i, x in enumerate(est.steps[phase][rank]) if x != (0, 0)),
            tuple(est.a2a[phase][rank]))


def gather(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def reduce(vals: list[float | int], op: dist.ReduceOp, dtype: torch.dtype) -> list[Any]:
    t = torch.tensor(vals, dtype=dtype)
    dist.all_reduce(t, op=op)
    return t.tolist()


def bench_config(cfg: Config, repeats: int, rank: int, world: int) -> dict[str, Any]:
    x = make_inputs(cfg, rank)
    shapes = (tuple(x[0].shape), tuple(x[1].shape))
    plans = {ph: ringmem.plan(*shapes, world=world, dtype=DTYPE, causal=not cfg.decode,
                              layout=LAYOUT, device_type="cpu", backward=ph == "fwd+bwd",
                              ulysses="auto")
             for ph in PHASES}
    options = list(plans["fwd"].schedules)
    res: dict[str, Any] = {
        "config": asdict(cfg) | {"q_local": shapes[0], "kv_local": shapes[1]},
        "options": options,
        "plan": {ph: {"choice": p.choice, "predicted_ms": {n: e.time_s * 1e3 for n, e in
                                                            p.schedules.items()}}
                 for ph, p in plans.items()},
        "times": {}, "totals": {}, "match": {}, "mismatches": [], "auto_ran": {}}
    outs: dict[str, tuple[Tensor, list[Tensor]]] = {}
    for ph in PHASES:
        times, warm = timed({s: runner(cfg, x, s, ph, world) for s in (*options, "auto")},
                            repeats)
        for s, t in times.items():
            res["times"][f"{s} {ph}"] = t
        # which option auto ran, told by the bytes of its warm-up
        parts = ("fwd",) if ph == "fwd" else ("fwd", "bwd")
        ran = [n for n in options if all(
            signature(warm["auto"], p) == planned(plans["fwd+bwd"].schedules[n], p, rank)
            for p in parts)]
        got = gather("+".join(ran) or "none")
        res["auto_ran"][ph] = got[0] if len(set(got)) == 1 else "/".join(got)
    for s in options:
        stats = ringmem.CommStats()  # one extra fwd+bwd: bytes, and outputs to compare
        outs[s] = runner(cfg, x, s, "fwd+bwd", world)(stats)
        est = plans["fwd+bwd"].schedules[s]
        bad = [{"option": s, "rank": rank, "phase": p, "measured": signature(stats, p),
                "expected": planned(est, p, rank)} for p in ("fwd", "bwd")
               if signature(stats, p) != planned(est, p, rank)]
        bad = [b for bs in gather(bad) for b in bs]
        res["mismatches"] += bad
        res["match"][s] = {p: all(b["phase"] != p for b in bad) for p in ("fwd", "bwd")}
        tot = reduce([*stats.total("fwd"), *stats.total("bwd")], dist.ReduceOp.SUM, torch.int64)
        res["totals"][s] = dict(zip(("fwd sent", "fwd recv", "bwd sent", "bwd recv"), tot))
    o_kv, g_kv = outs["kv"]
    res["out_diff"], res["grad_diff"] = reduce(
        [max((o - o_kv).abs().max().item() for o, _ in outs.values()),
         max((a - b).abs().max().item() for _, g in outs.values() for a, b in zip(g, g_kv))],
        dist.ReduceOp.MAX, torch.float64)
    return res


def fmt_bytes(n: int) -> str:
    for unit, size in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def build_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        opts = r["options"]
        for ph in PHASES:
            t = {s: statistics.median(r["times"][f"{s} {ph}"]) for s in (*opts, "auto")}
            choice = r["plan"][ph]["choice"]
            best = min(opts, key=lambda s: t[s])
            spread = {s: (min(r["times"][f"{s} {ph}"]), max(r["times"][f"{s} {ph}"]))
                      for s in (*opts, "auto")}
            rows.append({"config": r["config"]["name"], "phase": ph, "t": t, "spread": spread,
                         "options": opts,
                         "faster": best, "choice": choice,
                         "predicted_ms": r["plan"][ph]["predicted_ms"],
                         "within": t[choice] <= SLACK * t[best],
                         "auto_within": t["auto"] <= SLACK * t[best],
                         "auto_ran": r["auto_ran"][ph],
                         "match": all(r["match"][s]["fwd" if ph == "fwd" else "bwd"]
                                      for s in opts),
                         "bytes_total": {s: r["totals"][s]["fwd sent"] + (
                             r["totals"][s]["bwd sent"] if ph == "fwd+bwd" else 0)
                             for s in opts}})
    return rows


def md_table(head: list[str], body: list[list[str]]) -> str:
    return "\n".join("| " + " | ".join(r) + " |" for r in (head, ["---"] * len(head), *body))


def render_tables(rows: list[dict[str, Any]]) -> tuple[str, str]:
    """The results table (measured and predicted per option) and the auto table."""
    main = md_table(
        ["config", "phase", "measured s [min-max over the rounds] (predicted ms), bytes sent "
         "by all ranks", "fastest",
         "plan's choice", "choice within 5%?", "bytes match plan"],
        [[w["config"], w["phase"], "<br>".join(
            f"{s}: {w['t'][s]:.4f} [{w['spread'][s][0]:.4f}-{w['spread'][s][1]:.4f}] "
            f"({w['predicted_ms'][s]:.1f}), "
            f"{fmt_bytes(w['bytes_total'][s])}" for s in w["options"]), w["faster"],
          w["choice"], "PASS" if w["within"] else "FAIL", str(w["match"])] for w in rows])
    auto = md_table(
        ["config", "phase", "plan's choice", "auto ran (from its bytes)", "T auto (s)",
         "T auto / T fastest", "within 5%?"],
        [[w["config"], w["phase"], w["choice"], w["auto_ran"], f"{w['t']['auto']:.4f}",
          f"{w['t']['auto'] / w['t'][w['faster']]:.3f}",
          "PASS" if w["auto_within"] else "FAIL"] for w in rows])
    return main, auto


def summary(rows: list[dict[str, Any]]) -> str:
    """'When each option wins', from the numbers."""
    wins: dict[str, list[str]] = {}
    for w in rows:
        wins.setdefault(w["faster"], []).append(f"{w['config']} {w['phase']}")
    parts = [f"{s} was fastest in {len(v)}/{len(rows)} rows ({', '.join(v)})."
             for s, v in wins.items()]
    agree = sum(w["choice"] == w["faster"] for w in rows)
    fails = [f"{w['config']} {w['phase']}" for w in rows if not w["auto_within"]]
    same = sum(w["auto_ran"] == w["choice"] for w in rows)
    parts.append(f"The plan chose the measured-fastest option in {agree}/{len(rows)} rows; "
                 f"schedule=\"auto\", ulysses=\"auto\" ran within 5% of the fastest in "
                 f"{len(rows) - len(fails)}/{len(rows)}"
                 + (f" (FAIL: {', '.join(fails)})" if fails else "") + f" and ran the plan's "
                 f"choice in {same}/{len(rows)} rows.")
    return " ".join(parts)


def describe(c: Config) -> str:
    if c.decode:
        return (f"{c.name}: q 1 token per rank (not sharded), Hq={c.hq}; K/V {c.seq} keys "
                f"global, sharded, Hkv={c.hkv}; D={c.dim}; non-causal")
    return f"{c.name}: S={c.seq}, Hq={c.hq}, Hkv={c.hkv}, D={c.dim}, causal"


# Published rankings the plan is checked against (qualitative: who wins); the measured
# figures themselves are reproduced by the simulator's validation (benchmarks/sim_validation.py).
GPU_CASES = (
    {"name": "8xA100 NVSwitch, yunchang's forward table (131072 tokens, batch 2, 8 heads, "
             "d=128, fp16, causal; iter/s: Ulysses 4 x ring 2 21.46, Ulysses 2 x ring 4 "
             "21.20, Ulysses 8 21.00, zigzag ring 8 17.78; github.com/feifeibear/"
             "long-context-attention, media/benchmark_results.png)",
     "q": (2, 16384, 8, 128), "kv": (2, 16384, 8, 128), "world": 8, "dtype": torch.float16,
     "ic": Interconnect(name="nvswitch-a100", topology="switch", bandwidth=240e9,
                        latency=10e-6), "inter": None, "per_node": 0, "flops": 190e12,
     "published": ["ulysses4+kv", "ulysses2+kv", "ulysses", "kv"]},
    {"name": "2 nodes x 8 H100, NVSwitch inside, InfiniBand across (TransformerEngine / "
             "Megatron hierarchical CP: a2a on intra-node links, p2p across nodes, scales "
             "past a2a alone; NeMo Megatron-Bridge docs, 'Hybrid / Hierarchical Context "
             "Parallel'); 131072 tokens, 32 q / 8 kv heads, d=128, bf16, causal",
     "q": (1, 131072 // 16, 32, 128), "kv": (1, 131072 // 16, 8, 128), "world": 16,
     "dtype": torch.bfloat16, "ic": "nvswitch", "inter": "ib", "per_node": 8,
     "flops": 400e12, "published": ["ulysses8+kv", "ulysses"]},
)


def gpu_predictions() -> str:
    """The plan's ranking for GPU clusters, beside the published ones."""
    lines = []
    for c in GPU_CASES:
        p = ringmem.plan(c["q"], c["kv"], world=c["world"], dtype=c["dtype"], causal=True,
                         layout=LAYOUT, interconnect=c["ic"], inter_node=c["inter"],
                         gpus_per_node=c["per_node"], flops=c["flops"], ulysses="auto")
        ranked = sorted(p.schedules, key=lambda n: p.schedules[n].time_s)
        pub = c["published"]
        order = [n for n in ranked if n in pub]
        table = md_table(
            ["option", "predicted ms", "predicted iter/s", "comm ms", "MiB sent"],
            [[n, f"{p.schedules[n].time_s * 1e3:.3f}", f"{1 / p.schedules[n].time_s:.2f}",
              f"{p.schedules[n].comm_s * 1e3:.3f}", f"{p.schedules[n].bytes() / 2**20:.0f}"]
             for n in ranked])
        ic = c["ic"] if isinstance(c["ic"], str) else c["ic"].name
        lines.append(
            f"### {c['name']}\n\nper GPU: q {list(c['q'])}, kv {list(c['kv'])}, {LAYOUT}, "
            f"forward, {c['flops'] / 1e12:.0f} TFLOP/s; links {ic}"
            + (f" + {c['inter']} across nodes of {c['per_node']}" if c["inter"] else "")
            + f".\n\n{table}\n\nPlan's choice: **{p.choice}**. Published order "
            f"{' > '.join(pub)}; predicted order of those: {' > '.join(order)}; same order: "
            f"**{'yes' if order == pub else 'no'}**.")
    return "\n\n".join(lines)


def report(a: argparse.Namespace, configs: list[Config], results: list[dict[str, Any]],
           problems: list[str]) -> None:
    """Rank 0: print the tables, write the markdown report and the JSON next to it."""
    rows = build_rows(results)
    (table, auto), text = render_tables(rows), summary(rows)
    checks = "\n".join(
        f"- {r['config']['name']} (q local {list(r['config']['q_local'])}, kv local "
        f"{list(r['config']['kv_local'])}): every option vs kv: max |out diff| "
        f"{r['out_diff']:.2e}, max |grad diff| {r['grad_diff']:.2e}"
        for r in results) + f"\n\nProblems: {'; '.join(problems) or 'none'}"
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), "load_average_end": [round(x, 2) for x in os.getloadavg()],
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "ringmem": ringmem.__version__, "git commit": git_commit()},
            "config": {"repeats": a.repeats, "quick": a.quick, "world size":
                       dist.get_world_size(), "threads per rank": 1, "process group": "gloo",
                       "dtype": "fp32", "layout": LAYOUT, "batch": 1,
                       "configs": [describe(c) for c in configs]}}
    gpu = gpu_predictions()
    print(f"{table}\n\n{auto}\n\n{checks}\n\n{text}\n\n{gpu}", flush=True)
    cfg = "\n".join(f"- {v}" if k == "configs" else f"- {k}: {v}"
                     for k, vs in meta["config"].items()
                     for v in (vs if k == "configs" else [vs]))
    m = meta["machine"]
    md = (f"# ringmem parallel options: ring schedules x Ulysses degree vs auto, CPU\n\n"
          f"- date: {meta['date']}\n- machine: {m['platform']}, CPU: {m['cpu']}, "
          f"cpu_count: {m['cpu_count']}\n- load average (1, 5, 15 min) at the end: "
          f"{meta['load_average_end']} (other jobs on the machine skew every timing)"
          "\n\n## Versions\n\n"
          + "\n".join(f"- {k}: {v}" for k, v in meta["versions"].items())
          + f"\n\n## Config\n\n{cfg}\n\n## Results\n\n{table}\n\n"
          f"measured: median over {a.repeats} rounds (each runs every option once, in turn) of "
          f"the slowest rank's wall time (s); "
          f"predicted: ringmem.plan on the local shapes, device_type=cpu (loopback), backward "
          f"as the phase (ms). within 5%: T(plan's choice) <= {SLACK} x T(fastest). Bytes "
          f"match plan: every option's ring steps and all-to-alls, every rank, both phases.\n\n"
          f"## schedule=\"auto\", ulysses=\"auto\"\n\n{auto}\n\n## Correctness and bytes\n\n"
          f"{checks}\n\n## When each option wins\n\n{text}\n\n"
          f"## Predicted for GPU clusters (the same plan, GPU link models)\n\n{gpu}\n")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    out.with_suffix(".json").write_text(json.dumps(
        {**meta, "rows": rows, "results": results, "problems": problems}, indent=2) + "\n")
    print(f"wrote {out} and {out.with_suffix('.json')}", flush=True)


def problems_of(results: list[dict[str, Any]]) -> list[str]:
    """Byte-count or correctness failures (identical on every rank: all inputs are reduced)."""
    out = [f"{r['config']['name']}: {m['option']} {m['phase']} rank {m['rank']}: plan "
           f"{m['expected']} vs measured {m['measured']}" for r in results
           for m in r["mismatches"]]
    out += [f"{r['config']['name']}: options differ from kv: {k} {r[k]:.2e} > {TOL:g}"
            for r in results for k in ("out_diff", "grad_diff") if not r[k] <= TOL]
    return out


def progress(configs: list[Config], rank: int) -> Iterator[Config]:
    """A tqdm bar over the configurations on rank 0 (printed lines without tqdm)."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    bar = tqdm(configs, file=sys.stderr) if tqdm is not None and rank == 0 else None
    for i, cfg in enumerate(bar if bar is not None else configs):
        if bar is not None:
            bar.set_description(cfg.name)
        elif rank == 0:
            print(f"[{i + 1}/{len(configs)}] {cfg.name}", flush=True)
        yield cfg


def main() -> None:
    a = parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    div = 8 if a.quick else 1
    configs = [Config(c.name, c.seq // div, c.hq, c.hkv, c.dim, c.decode) for c in CONFIGS]
    results = [bench_config(cfg, a.repeats, rank, world) for cfg in progress(configs, rank)]
    problems = problems_of(results)
    if rank == 0:
        report(a, configs, results, problems)
    dist.barrier()
    dist.destroy_process_group()
    if problems:
        sys.exit(1)


if __name__ == "__main__":
    main()
