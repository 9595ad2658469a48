"""Ring schedule benchmark: "kv" (K/V travel) vs "q" (TokenRing) vs "auto", on CPU/gloo.

Run: torchrun --standalone --nproc-per-node 2 benchmarks/schedules.py [--repeats 5]
     [--out benchmarks/results/schedules.md] [--quick]
Exit status 1 only if measured bytes differ from ringmem.plan or kv and q disagree.
"""
from __future__ import annotations

import argparse
import json
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
from _common import git_commit, machine

SCHEDS = ("kv", "q")
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
    p.add_argument("--repeats", type=int, default=5)
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


def runner(cfg: Config, x: tuple[Tensor, ...], schedule: str,
           phase: str) -> Callable[[ringmem.CommStats | None], tuple[Tensor, list[Tensor]]]:
    """A call of one phase: returns (out, grads of q, k, v; empty for fwd)."""
    q, k, v, dout = x
    leaves = [] if phase == "fwd" else [t.detach().clone().requires_grad_() for t in (q, k, v)]

    def run(stats: ringmem.CommStats | None = None) -> tuple[Tensor, list[Tensor]]:
        kw = dict(causal=not cfg.decode, layout=LAYOUT, schedule=schedule, stats=stats)
        if phase == "fwd":
            with torch.no_grad():
                return ringmem.ring_attention(q, k, v, **kw), []
        for t in leaves:
            t.grad = None
        out = ringmem.ring_attention(*leaves, **kw)
        out.backward(dout)
        return out.detach(), [t.grad for t in leaves]
    return run


def timed(fn: Callable[..., Any], repeats: int) -> tuple[list[float], ringmem.CommStats]:
    """Warm-up (recording its bytes), then `repeats` runs timed as the slowest rank's."""
    warm = ringmem.CommStats()
    fn(warm)
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        times.append(dt.item())
    return times, warm


def steps_of(stats: ringmem.CommStats, phase: str, world: int) -> list[tuple[int, int]]:
    """[(sent, recv)] per step (missing steps 0; steps past the ring appended)."""
    per = stats.per_step(phase)
    return [per.get(i, (0, 0)) for i in range(world)] + [per[i] for i in sorted(per) if i >= world]


def gather(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def reduce(vals: list[float | int], op: dist.ReduceOp, dtype: torch.dtype) -> list[Any]:
    t = torch.tensor(vals, dtype=dtype)
    dist.all_reduce(t, op=op)
    return t.tolist()


def check_bytes(stats: ringmem.CommStats, plan: ringmem.Plan, s: str, rank: int,
                world: int) -> tuple[dict[str, list[tuple[int, int]]], list[dict], bool]:
    """This rank's measured bytes per step, every rank's mismatches vs the plan, and whether
    all ranks matched (all_reduce MIN)."""
    measured = {p: steps_of(stats, p, world) for p in ("fwd", "bwd")}
    expected = plan.schedules[s].steps
    bad = [{"schedule": s, "rank": rank, "phase": p, "step": i, "measured": m,
            "expected": expected[p][rank][i] if i < world else None}
           for p in ("fwd", "bwd") for i, m in enumerate(measured[p])
           if i >= world or m != tuple(expected[p][rank][i])]
    ok = reduce([0 if bad else 1], dist.ReduceOp.MIN, torch.int64)[0]
    return measured, [b for bs in gather(bad) for b in bs], bool(ok)


def bench_config(cfg: Config, repeats: int, rank: int, world: int) -> dict[str, Any]:
    x = make_inputs(cfg, rank)
    shapes = (tuple(x[0].shape), tuple(x[1].shape))
    plans = {ph: ringmem.plan(*shapes, world=world, dtype=DTYPE, causal=not cfg.decode,
                              layout=LAYOUT, device_type="cpu", backward=ph == "fwd+bwd")
             for ph in PHASES}
    res: dict[str, Any] = {
        "config": asdict(cfg) | {"q_local": shapes[0], "kv_local": shapes[1]},
        "plan": {ph: {"choice": p.choice, "predicted_ms": {n: e.time_s * 1e3 for n, e in
                                                            p.schedules.items()}}
                 for ph, p in plans.items()},
        "times": {}, "steps_rank0": {}, "totals": {}, "match": {}, "mismatches": [],
        "auto_ran": {}}
    outs: dict[str, tuple[Tensor, list[Tensor]]] = {}
    for s in (*SCHEDS, "auto"):
        for ph in PHASES:
            res["times"][f"{s} {ph}"], warm = timed(runner(cfg, x, s, ph), repeats)
            if s == "auto":  # which schedule auto ran, told by the bytes of its warm-up
                parts = ("fwd",) if ph == "fwd" else ("fwd", "bwd")
                ran = [n for n in SCHEDS if all(
                    steps_of(warm, p, world) == list(plans["fwd+bwd"].schedules[n].steps[p][rank])
                    for p in parts)]
                got = gather("+".join(ran) or "neither")
                res["auto_ran"][ph] = got[0] if len(set(got)) == 1 else "/".join(got)
        if s == "auto":
            continue
        stats = ringmem.CommStats()  # one extra fwd+bwd: bytes, and outputs to compare
        outs[s] = runner(cfg, x, s, "fwd+bwd")(stats)
        measured, bad, ok = check_bytes(stats, plans["fwd+bwd"], s, rank, world)
        res["steps_rank0"][s] = gather(measured)[0]
        res["mismatches"] += bad
        res["match"][s] = {p: ok and all(b["phase"] != p for b in bad) for p in ("fwd", "bwd")}
        tot = reduce([*stats.total("fwd"), *stats.total("bwd")], dist.ReduceOp.SUM, torch.int64)
        res["totals"][s] = dict(zip(("fwd sent", "fwd recv", "bwd sent", "bwd recv"), tot))
    (o_kv, g_kv), (o_q, g_q) = outs["kv"], outs["q"]
    res["out_diff"], res["grad_diff"] = reduce(
        [(o_kv - o_q).abs().max().item(),
         max((a - b).abs().max().item() for a, b in zip(g_kv, g_q))],
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
        for ph in PHASES:
            t = {s: statistics.median(r["times"][f"{s} {ph}"]) for s in (*SCHEDS, "auto")}
            choice, part = r["plan"][ph]["choice"], "fwd" if ph == "fwd" else "bwd"
            rows.append({"config": r["config"]["name"], "phase": ph, "t": t,
                         "faster": min(SCHEDS, key=lambda s: t[s]), "choice": choice,
                         "predicted_ms": r["plan"][ph]["predicted_ms"],
                         "within": t[choice] <= SLACK * min(t["kv"], t["q"]),
                         "auto_ran": r["auto_ran"][ph],
                         "bytes_rank0": {s: [st for st, _ in r["steps_rank0"][s][part]]
                                         for s in SCHEDS},
                         "match": {s: r["match"][s][part] for s in SCHEDS},
                         "bytes_total": {s: r["totals"][s]["fwd sent"] + (
                             r["totals"][s]["bwd sent"] if ph == "fwd+bwd" else 0)
                             for s in SCHEDS}})
    return rows


def md_table(head: list[str], body: list[list[str]]) -> str:
    return "\n".join("| " + " | ".join(r) + " |" for r in (head, ["---"] * len(head), *body))


def render_tables(rows: list[dict[str, Any]]) -> tuple[str, str]:
    """The results table and the schedule="auto" table."""
    def bts(w: dict[str, Any], s: str) -> str:
        return ", ".join(fmt_bytes(b) for b in w["bytes_rank0"][s])

    main = md_table(
        ["config", "phase", "T kv (s)", "T q (s)", "faster", "plan's choice",
         "plan's predicted kv / q (ms)", "within 5%?", "bytes/step kv (rank 0 sent)",
         "bytes/step q (rank 0 sent)", "bytes match plan"],
        [[w["config"], w["phase"], f"{w['t']['kv']:.4f}", f"{w['t']['q']:.4f}", w["faster"],
          w["choice"], f"{w['predicted_ms']['kv']:.2f} / {w['predicted_ms']['q']:.2f}",
          "PASS" if w["within"] else "FAIL", bts(w, "kv"), bts(w, "q"),
          f"kv {w['match']['kv']}, q {w['match']['q']}"] for w in rows])
    auto = md_table(
        ["config", "phase", "plan's choice", "auto ran (from its bytes)", "T auto (s)",
         "T auto / min(T kv, T q)"],
        [[w["config"], w["phase"], w["choice"], w["auto_ran"], f"{w['t']['auto']:.4f}",
          f"{w['t']['auto'] / min(w['t']['kv'], w['t']['q']):.3f}"] for w in rows])
    return main, auto


def summary(rows: list[dict[str, Any]]) -> str:
    """'When each schedule wins', from the numbers."""
    parts = []
    for ph in PHASES:
        ph_rows = [w for w in rows if w["phase"] == ph]
        for s, o in (("kv", "q"), ("q", "kv")):
            won = [f"{w['config']} ({w['t'][o] / w['t'][s]:.2f}x faster, sending "
                   f"{w['bytes_total'][s] / max(w['bytes_total'][o], 1):.3g}x {o}'s bytes)"
                   for w in ph_rows if w["faster"] == s]
            parts.append(f"{ph}: {s} was faster in {len(won)}/{len(ph_rows)} configs"
                         + (f": {', '.join(won)}" if won else "") + ".")
    agree = sum(w["choice"] == w["faster"] for w in rows)
    fails = [f"{w['config']} {w['phase']}" for w in rows if not w["within"]]
    same = sum(w["auto_ran"] == w["choice"] for w in rows)
    parts.append(f"The plan chose the measured-faster schedule in {agree}/{len(rows)} rows; "
                 f"its choice was within 5% of the best in {len(rows) - len(fails)}/{len(rows)}"
                 + (f" (FAIL: {', '.join(fails)})" if fails else "") + f". schedule=\"auto\" "
                 f"ran the plan's choice in {same}/{len(rows)} rows. (Bytes: sent by all ranks "
                 f"in the phase.)")
    return " ".join(parts)






def describe(c: Config) -> str:
    if c.decode:
        return (f"{c.name}: q 1 token per rank (not sharded), Hq={c.hq}; K/V {c.seq} keys "
                f"global, sharded, Hkv={c.hkv}; D={c.dim}; non-causal")
    return f"{c.name}: S={c.seq}, Hq={c.hq}, Hkv={c.hkv}, D={c.dim}, causal"


def report(a: argparse.Namespace, configs: list[Config], results: list[dict[str, Any]],
           problems: list[str]) -> None:
    """Rank 0: print the tables, write the markdown report and the JSON next to it."""
    rows = build_rows(results)
    (table, auto), text = render_tables(rows), summary(rows)
    checks = "\n".join(
        f"- {r['config']['name']} (q local {list(r['config']['q_local'])}, kv local "
        f"{list(r['config']['kv_local'])}): max |out kv - out q| {r['out_diff']:.2e}, max "
        f"|grad kv - grad q| {r['grad_diff']:.2e}; bytes sent by all ranks, fwd / bwd: "
        + "; ".join(f"{s} {fmt_bytes(r['totals'][s]['fwd sent'])} / "
                    f"{fmt_bytes(r['totals'][s]['bwd sent'])}" for s in SCHEDS)
        for r in results) + f"\n\nProblems: {'; '.join(problems) or 'none'}"
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "ringmem": ringmem.__version__, "git commit": git_commit()},
            "config": {"repeats": a.repeats, "quick": a.quick, "world size":
                       dist.get_world_size(), "threads per rank": 1, "process group": "gloo",
                       "dtype": "fp32", "layout": LAYOUT, "batch": 1,
                       "configs": [describe(c) for c in configs]}}
    print(f"{table}\n\n{auto}\n\n{checks}\n\n{text}", flush=True)
    cfg = "\n".join(f"- {v}" if k == "configs" else f"- {k}: {v}"
                     for k, vs in meta["config"].items()
                     for v in (vs if k == "configs" else [vs]))
    m = meta["machine"]
    md = (f"# ringmem ring schedules: kv vs q (TokenRing) vs auto, CPU\n\n"
          f"- date: {meta['date']}\n- machine: {m['platform']}, CPU: {m['cpu']}, "
          f"cpu_count: {m['cpu_count']}\n\n## Versions\n\n"
          + "\n".join(f"- {k}: {v}" for k, v in meta["versions"].items())
          + f"\n\n## Config\n\n{cfg}\n\n## Results\n\n{table}\n\n"
          f"T: median over {a.repeats} runs of the slowest rank's wall time. within 5%: "
          f"T(plan's choice) <= {SLACK} x min(T kv, T q). Plan: ringmem.plan on the local "
          f"shapes, device_type=cpu (loopback interconnect), backward as the phase. "
          f"bytes/step: rank 0 per ring step; fwd+bwd rows show the backward's steps.\n\n"
          f"## schedule=\"auto\"\n\n{auto}\n\n## Correctness and bytes\n\n{checks}\n\n"
          f"## When each schedule wins\n\n{text}\n")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    out.with_suffix(".json").write_text(json.dumps(
        {**meta, "rows": rows, "results": results, "problems": problems}, indent=2) + "\n")
    print(f"wrote {out} and {out.with_suffix('.json')}", flush=True)


def problems_of(results: list[dict[str, Any]]) -> list[str]:
    """Byte-count or correctness failures (identical on every rank: all inputs are reduced)."""
    out = [f"{r['config']['name']}: {m['schedule']} {m['phase']} step {m['step']} rank "
           f"{m['rank']}: plan {m['expected']} vs measured {m['measured']} (sent, recv)"
           for r in results for m in r["mismatches"]]
    out += [f"{r['config']['name']}: kv vs q {k} {r[k]:.2e} > {TOL:g}"
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
