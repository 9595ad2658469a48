"""Packed documents and sliding windows at 2 ranks on CPU.

1. Packed causal rows (document lengths log-uniform in [--min-len, --max-len]): ringmem at 2
   ranks x 1 thread (layouts "document", "zigzag") vs one process on both cores running
   PyTorch SDPA once per document (no padding, no packing). E = T(single) / T(ringmem);
   target >= 0.85 with the per-document layout. Work imbalance per rank (exact (q, k) pairs
   from `ringmem.plan`, which the ring computes): target <= 5%.
2. Window scaling: causal window W on the contiguous layout, time vs sequence length at
   fixed W must grow linearly (log-log slope ~1; target <= 1.15).

Run: torchrun --standalone --nproc-per-node 2 benchmarks/varlen.py
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ringmem

from _common import fwd_bwd, git_commit, grad_leaves, machine, timed


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    for flag, typ, default in (("--tokens", int, 65536), ("--heads", int, 4),
                               ("--dim", int, 64), ("--min-len", int, 128),
                               ("--max-len", int, 32768), ("--rows", int, 3),
                               ("--window", int, 512), ("--repeats", int, 3),
                               ("--out", str, "benchmarks/results/varlen.md")):
        p.add_argument(flag, type=typ, default=default)
    p.add_argument("--window-lens", default="8192,16384,32768,65536")
    return p.parse_args()


def draw_lengths(rng: random.Random, total: int, lo: int, hi: int) -> list[int]:
    """Log-uniform lengths in [lo, hi] filling exactly `total` tokens (the last one cut)."""
    out: list[int] = []
    while sum(out) < total:
        n = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
        out.append(min(n, total - sum(out)))
    return out


def packed(a: argparse.Namespace, cu: list[int], seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    shape = (1, cu[-1], a.heads, a.dim)
    q, k, v, dout = (torch.randn(shape, generator=g) for _ in range(4))
    res: dict[str, Any] = {"documents": len(cu) - 1, "tokens": cu[-1]}
    if dist.get_rank() == 0:  # the baseline alone on both cores; rank 1 waits
        torch.set_num_threads(2)
        docs = [[t[:, a0:a1].transpose(1, 2).contiguous() for t in (q, k, v, dout)]
                for a0, a1 in zip(cu, cu[1:])]
        sdpa = lambda d: F.scaled_dot_product_attention(*d[:3], is_causal=True)  # noqa: E731
        with torch.no_grad():
            res["single fwd"] = statistics.median(timed(lambda: [sdpa(d) for d in docs], a.repeats,
                                             over_ranks=False))
        runs = [fwd_bwd(lambda *t: F.scaled_dot_product_attention(*t, is_causal=True),
                        grad_leaves(d[:3]), d[3]) for d in docs]
        res["single fwd+bwd"] = statistics.median(timed(lambda: [r() for r in runs], a.repeats,
                                             over_ranks=False))
        torch.set_num_threads(1)
    dist.barrier()
    world = dist.get_world_size()
    for layout in ("document", "zigzag"):
        kw = dict(layout=layout, cu_seqlens=cu)
        ql, kl, vl, dl = (ringmem.shard(t, 1, **kw) for t in (q, k, v, dout))
        attn = lambda *t: ringmem.ring_attention(*t, causal=True, **kw)  # noqa: E731
        with torch.no_grad():
            res[f"{layout} fwd"] = statistics.median(timed(lambda: attn(ql, kl, vl), a.repeats))
        step = fwd_bwd(attn, grad_leaves((ql, kl, vl)), dl)
        res[f"{layout} fwd+bwd"] = statistics.median(timed(step, a.repeats))
        est = ringmem.plan(tuple(ql.shape), tuple(kl.shape), world=world,
                           dtype=torch.float32, device_type="cpu", layout=layout,
                           cu_seqlens=cu).schedules["kv"]
        work = [sum(r) for r in est.pairs]
        res[f"{layout} imbalance"] = max(work) / (sum(work) / world) - 1
        res[f"{layout} padding"] = ql.shape[1] * world / cu[-1] - 1
    return res


def window_scaling(a: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for n in (int(x) for x in a.window_lens.split(",")):
        g = torch.Generator().manual_seed(n)
        q, k, v, dout = (ringmem.shard(torch.randn(1, n, a.heads, a.dim, generator=g), 1,
                                       layout="contiguous") for _ in range(4))
        attn = lambda *t: ringmem.ring_attention(  # noqa: E731
            *t, causal=True, layout="contiguous", window=(a.window - 1, -1))
        with torch.no_grad():
            fwd = statistics.median(timed(lambda: attn(q, k, v), a.repeats))
        rows.append({"seq": n, "fwd": fwd, "fwd+bwd": statistics.median(timed(
            fwd_bwd(attn, grad_leaves((q, k, v)), dout), a.repeats))})
    return rows


def slope(rows: list[dict[str, Any]], key: str) -> float:
    xs = [math.log(r["seq"]) for r in rows]
    ys = [math.log(r[key]) for r in rows]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def plot(out: Path, packs: list[dict[str, Any]], wins: list[dict[str, Any]]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"row {i}\n{p['documents']} docs" for i, p in enumerate(packs)]
    for j, (layout, color) in enumerate((("document", "tab:blue"), ("zigzag", "tab:gray"))):
        ax1.bar([i + 0.4 * j for i in range(len(packs))],
                [p["single fwd+bwd"] / p[f"{layout} fwd+bwd"] for p in packs], 0.4,
                label=f"layout {layout}", color=color)
    ax1.axhline(0.85, ls="--", color="red", label="target 0.85")
    ax1.set_xticks([i + 0.2 for i in range(len(packs))], labels)
    ax1.set_ylabel("E = T(single, per-doc SDPA) / T(2 ranks)")
    ax1.set_title("packed causal rows, fwd+bwd")
    ax1.legend()
    seq = [r["seq"] for r in wins]
    for key, marker in (("fwd", "o"), ("fwd+bwd", "s")):
        ax2.loglog(seq, [r[key] for r in wins], marker=marker, label=key)
        ax2.loglog(seq, [wins[0][key] * s / seq[0] for s in seq], ls=":", color="gray")
    ax2.set_xlabel("sequence length (tokens)")
    ax2.set_ylabel("time (s)")
    ax2.set_title("fixed causal window: time vs length (dotted: linear)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


def main() -> None:
    a = parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    rng = random.Random(0)
    bar = None
    if rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=a.rows + 1, desc="varlen")
    packs = []
    for i in range(a.rows):
        cu = [0]
        for n in draw_lengths(rng, a.tokens, a.min_len, a.max_len):
            cu.append(cu[-1] + n)
        packs.append(packed(a, cu, seed=i))
        if bar:
            bar.update()
    wins = window_scaling(a)
    if bar:
        bar.update()
        bar.close()
    if rank == 0:
        report(a, packs, wins)
    dist.destroy_process_group()


def report(a: argparse.Namespace, packs: list[dict[str, Any]],
           wins: list[dict[str, Any]]) -> None:
    e = {s: [p[f"single {s}"] / p[f"document {s}"] for p in packs] for s in ("fwd", "fwd+bwd")}
    checks = {
        "E fwd+bwd, document layout (min over rows)": (min(e["fwd+bwd"]), ">= 0.85",
                                                       min(e["fwd+bwd"]) >= 0.85),
        "E fwd, document layout (min over rows)": (min(e["fwd"]), ">= 0.85",
                                                   min(e["fwd"]) >= 0.85),
        "work imbalance, document layout (max)": (max(p["document imbalance"] for p in packs),
                                                  "<= 0.05", max(p["document imbalance"]
                                                                 for p in packs) <= 0.05),
        "window: log-log slope of fwd time": (slope(wins, "fwd"), "<= 1.15",
                                              slope(wins, "fwd") <= 1.15),
        "window: log-log slope of fwd+bwd time": (slope(wins, "fwd+bwd"), "<= 1.15",
                                                  slope(wins, "fwd+bwd") <= 1.15),
    }
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), "commit": git_commit(),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "ringmem": ringmem.__version__},
            "config": {**vars(a), "world": dist.get_world_size(), "threads per rank": 1,
                       "single-process threads": 2, "dtype": "float32", "backend": "auto"}}
    lines = ["# Packed documents and sliding windows (2 ranks, CPU)\n",
             f"- date: {meta['date']}, commit {meta['commit']}",
             f"- machine: {meta['machine']}", f"- versions: {meta['versions']}",
             f"- config: {meta['config']}\n",
             "## Packed causal rows (fwd+bwd and fwd, median seconds)\n",
             "| row | docs | tokens | single per-doc SDPA | document layout | zigzag layout "
             "| E document | E zigzag | imbalance document | imbalance zigzag | padding |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, p in enumerate(packs):
        for s in ("fwd+bwd", "fwd"):
            lines.append(
                f"| {i} {s} | {p['documents']} | {p['tokens']} | {p[f'single {s}']:.3f} | "
                f"{p[f'document {s}']:.3f} | {p[f'zigzag {s}']:.3f} | "
                f"{p[f'single {s}'] / p[f'document {s}']:.3f} | "
                f"{p[f'single {s}'] / p[f'zigzag {s}']:.3f} | "
                f"{p['document imbalance']:.2%} | {p['zigzag imbalance']:.2%} | "
                f"{p['document padding']:.2%} |")
    lines += ["\nE = T(one process, 2 threads, SDPA per document) / T(ringmem, 2 ranks x 1 "
              "thread). Imbalance = max/mean - 1 of the (q, k) pairs each rank computes.\n",
              f"## Window scaling (causal window {a.window}, contiguous layout)\n",
              "| seq | fwd s | fwd+bwd s | fwd s per 1K tokens |", "|---|---|---|---|"]
    for r in wins:
        lines.append(f"| {r['seq']} | {r['fwd']:.3f} | {r['fwd+bwd']:.3f} | "
                     f"{1000 * r['fwd'] / r['seq']:.4f} |")
    lines += ["\n## Targets\n", "| metric | value | target | result |", "|---|---|---|---|"]
    for k, (v, t, ok) in checks.items():
        lines.append(f"| {k} | {v:.3f} | {t} | {'PASS' if ok else 'FAIL'} |")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(
        {**meta, "packed": packs, "window": wins,
         "checks": {k: {"value": v, "target": t, "pass": ok} for k, (v, t, ok)
                    in checks.items()}}, indent=2) + "\n")
    plot(out, packs, wins)
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
