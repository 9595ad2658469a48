"""Decode latency vs context length over a sharded KV cache, against the memory-bandwidth
floor, plus chunked-prefill throughput vs chunk size.

Run: torchrun --standalone --nproc-per-node 4 benchmarks/decode.py [--quick]

The floor is the bytes of K/V read per decode step (all ranks) divided by the memcpy
bandwidth that all ranks reach together, measured in the same run. Target: <= 1.5x the
floor at 1M tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

import ringmem
from ringmem.cache import CacheConfig, ShardedKVCache

from _common import cpu_model, git_commit

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="16384,65536,262144,1048576")
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--page-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--prefill-tokens", type=int, default=8192)
    p.add_argument("--prefill-chunks", default="512,1024,2048,4096,8192")
    p.add_argument("--out", default="benchmarks/results/decode.md")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    a = p.parse_args()
    if a.quick:
        a.contexts, a.steps, a.prefill_tokens, a.prefill_chunks = "4096,16384", 3, 1024, "256,1024"
    return a


def slowest(fn: Callable[[], Any]) -> float:
    """Wall time of fn on the slowest rank, all ranks starting together."""
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(dt, op=dist.ReduceOp.MAX)
    return dt.item()


def memcpy_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes/s copied by all ranks together (each copies nbytes at the same time)."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t = min(slowest(lambda: dst.copy_(src)) for _ in range(repeats))
    return dist.get_world_size() * nbytes / t


def fill(cache: ShardedKVCache, total: int, a: argparse.Namespace) -> None:
    """Grow sequence 0 of layer 0 to `total` tokens (synthetic K/V, positions striped)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    have = cache.stores[0].lens[0]
    want = total // world
    g = torch.Generator().manual_seed(1000 + rank)
    step = 16384
    for lo in range(have, want, step):
        n = min(step, want - lo)
        k, v = (torch.randn(n, a.kv_heads, a.dim, generator=g).to(DTYPES[a.dtype])
                for _ in range(2))
        pos = torch.arange(lo, lo + n) * world + rank
        cache.extend_local(0, 0, k, v, pos)
    cache.sync()


def decode_latency(cache: ShardedKVCache, a: argparse.Namespace) -> list[float]:
    g = torch.Generator().manual_seed(7)  # same new token on every rank
    dt = DTYPES[a.dtype]
    times = []
    for i in range(a.steps + 1):
        q = torch.randn(1, 1, a.q_heads, a.dim, generator=g).to(dt)
        k, v = (torch.randn(1, 1, a.kv_heads, a.dim, generator=g).to(dt) for _ in range(2))
        t = slowest(lambda: cache.decode(0, q, k, v))
        if i:  # the first step warms up
            times.append(t)
    return times


def local_latency(cache: ShardedKVCache, a: argparse.Namespace) -> float:
    """Median time of the rank-local paged attention alone (no merge), all ranks at once:
    the backend decode uses (`cache.decoder`: the compiled kernel on CPU)."""
    store = cache.stores[0]
    q = torch.randn(a.q_heads, a.dim).to(DTYPES[a.dtype])
    run = lambda: cache.decoder.decode(q, store.k, store.v, store.runs(0), a.dim ** -0.5)
    run()
    return statistics.median(slowest(run) for _ in range(a.steps))


def make_cache(a: argparse.Namespace, capacity: int, merge: str = "allgather",
               heads: tuple[int, int, int] | None = None,
               dtype: torch.dtype | None = None) -> ShardedKVCache:
    hq, hkv, d = heads or (a.q_heads, a.kv_heads, a.dim)
    return ShardedKVCache(CacheConfig(num_layers=1, q_heads=hq, kv_heads=hkv, head_dim=d,
                                      capacity=capacity, page_size=a.page_size,
                                      dtype=dtype or DTYPES[a.dtype], merge=merge))


def prefill_throughput(a: argparse.Namespace, chunk: int) -> float:
    """Tokens/s of a chunked prefill of one prompt (8 q heads, 2 kv heads, D=64, fp32)."""
    world, n = dist.get_world_size(), a.prefill_tokens
    cache = make_cache(a, n // world + a.page_size, heads=(8, 2, 64), dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, n, 8, 64, generator=g)
    k, v = (torch.randn(1, n, 2, 64, generator=g) for _ in range(2))

    def run() -> None:
        for c0 in range(0, n, chunk):
            parts = [cache.shard_chunk(t[:, c0:c0 + chunk]) for t in (q, k, v)]
            cache.prefill_chunk(0, *parts)

    return n / slowest(run)






def plot(rows: list[dict], prefill: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ctx = [r["context"] for r in rows]
    ax1.loglog(ctx, [r["latency_ms"] for r in rows], "o-", label="ringmem decode (median)")
    ax1.loglog(ctx, [r["floor_ms"] for r in rows], "k--", label="memory-bandwidth floor")
    ax1.loglog(ctx, [1.5 * r["floor_ms"] for r in rows], ":", color="gray", label="1.5x floor")
    ax1.set_xlabel("context tokens (all ranks)")
    ax1.set_ylabel("ms per decode step")
    ax1.set_title(f"decode latency, {dist.get_world_size()} ranks")
    ax1.legend()
    ax2.semilogx([p["chunk"] for p in prefill], [p["tokens_per_s"] for p in prefill], "o-",
                 base=2)
    ax2.set_xticks([p["chunk"] for p in prefill], [str(p["chunk"]) for p in prefill])
    ax2.set_xlabel("prefill chunk (tokens)")
    ax2.set_ylabel("tokens / s")
    ax2.set_title("chunked prefill throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    t_start = time.perf_counter()
    a = parse()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    contexts = [int(x) for x in a.contexts.split(",")]
    chunks = [int(x) for x in a.prefill_chunks.split(",")]
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(contexts) + 2 + len(chunks), disable=rank != 0)
    except ImportError:
        bar = None
    tick = (lambda msg: (bar.set_description(msg), bar.update(1))) if bar else (
        lambda msg: rank == 0 and print(msg, flush=True))
    bws = [memcpy_bandwidth()]  # measured again at the end: the floor uses the fastest
    tick("memcpy")
    item = torch.empty((), dtype=DTYPES[a.dtype]).element_size()
    cache = make_cache(a, max(contexts) // world + (a.steps + 2) * a.page_size)
    a.decode_backend = cache.decoder.name  # reported with the config
    rows = []
    for ctx in contexts:
        fill(cache, ctx, a)
        if ctx == contexts[-1]:
            bws.append(memcpy_bandwidth())  # under the same memory load as the big decode
        times = decode_latency(cache, a)
        read = 2 * cache.seq_len() * a.kv_heads * a.dim * item  # K and V, all ranks
        rows.append({"context": ctx, "latency_ms": 1e3 * statistics.median(times),
                     "min_ms": 1e3 * min(times), "max_ms": 1e3 * max(times),
                     "steps_ms": [1e3 * t for t in times], "read_bytes": read,
                     "local_ms": 1e3 * local_latency(cache, a)})
        tick(f"decode {ctx}")
    del cache
    bws.append(memcpy_bandwidth())
    bw = max(bws)  # the strictest floor: the fastest copy seen in this run
    for r in rows:
        r["floor_ms"] = 1e3 * r["read_bytes"] / bw
        r["ratio"] = r["latency_ms"] / r["floor_ms"]
    merges = {}
    for merge in ("allgather", "allreduce"):
        small = make_cache(a, contexts[0] // world + (a.steps + 2) * a.page_size, merge=merge)
        fill(small, contexts[0], a)
        merges[merge] = 1e3 * statistics.median(decode_latency(small, a))
    tick("merges")
    prefill = []
    for chunk in chunks:
        prefill.append({"chunk": chunk, "tokens_per_s": prefill_throughput(a, chunk)})
        tick(f"prefill chunk {chunk}")
    if bar:
        bar.close()
    if rank == 0:
        report(a, bws, rows, merges, prefill, world, time.perf_counter() - t_start)
    dist.destroy_process_group()


def report(a: argparse.Namespace, bws: list[float], rows: list[dict],
           merges: dict[str, float], prefill: list[dict], world: int,
           wall_s: float) -> None:
    bw = max(bws)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    last = rows[-1]
    target = "PASS" if last["ratio"] <= 1.5 else "FAIL"
    lines = [f"| context (tokens) | decode ms (median of {a.steps} steps) | min-max ms | "
             "local attention ms | floor ms | latency / floor |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['context']:,} | {r['latency_ms']:.2f} | {r['min_ms']:.2f}-"
              f"{r['max_ms']:.2f} | {r['local_ms']:.2f} | {r['floor_ms']:.2f} | "
              f"{r['ratio']:.2f} |" for r in rows]
    ptab = ["| prefill chunk | tokens/s |", "|---|---|"]
    ptab += [f"| {p['chunk']} | {p['tokens_per_s']:,.0f} |" for p in prefill]
    mtab = ["| merge | decode ms at {:,} tokens |".format(rows[0]["context"]), "|---|---|"]
    mtab += [f"| {k} | {v:.3f} |" for k, v in merges.items()]
    summary = (f"At {last['context']:,} tokens: {last['latency_ms']:.1f} ms per decode step "
               f"(median; {last['min_ms']:.1f}-{last['max_ms']:.1f} ms over the {a.steps} "
               f"steps), "
               f"{last['ratio']:.2f}x the floor of {last['floor_ms']:.1f} ms "
               f"(target <= 1.5x): {target}. The rank-local attention alone takes "
               f"{last['local_ms']:.1f} ms ({last['local_ms'] / last['floor_ms']:.2f}x the "
               f"floor); the rest is the cross-rank merge and step bookkeeping.")
    cfg = {k: v for k, v in vars(a).items()}
    cfg.update(world=world, threads_per_rank=1)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.platform()}, {cpu_model()}, {os.cpu_count()} cpus",
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "ringmem": ringmem.__version__, "git": git_commit()},
            "config": cfg, "memcpy_bytes_per_s": bw, "memcpy_samples": bws,
            "load_average_end": [round(x, 2) for x in os.getloadavg()],
            "wall_s": round(wall_s, 1)}
    png = out.with_suffix(".png")
    plot(rows, prefill, png)
    md = "\n".join([
        "# Distributed decode over a sharded KV cache", "",
        f"- date: {meta['date']}", f"- machine: {meta['machine']}",
        f"- versions: {meta['versions']}", f"- config: {cfg}",
        f"- wall time: {wall_s:.0f} s; load average (1, 5, 15 min) at the end: "
        f"{meta['load_average_end']} (other jobs on the machine skew every timing)",
        f"- memcpy bandwidth, all {world} ranks copying at once: {bw / 1e9:.1f} GB/s (the "
        f"fastest of {', '.join(f'{b / 1e9:.1f}' for b in bws)} GB/s measured at the start, "
        f"with the 1M cache resident, and at the end; the floor uses the fastest)", "",
        "## Decode latency vs context", "", *lines, "", summary, "",
        f"![decode latency and prefill throughput]({png.name})", "",
        "## Cross-rank merge", "", *mtab, "",
        "## Chunked prefill (8 q heads, 2 kv heads, D=64, fp32, "
        f"{a.prefill_tokens} tokens)", "", *ptab, ""])
    out.write_text(md)
    out.with_suffix(".json").write_text(json.dumps(
        {**meta, "decode": rows, "merge_ms": merges, "prefill": prefill}, indent=2) + "\n")
    print("\n".join(lines + ["", summary, ""] + mtab + [""] + ptab), flush=True)
    print(f"wrote {out}, {out.with_suffix('.json')}, {png}", flush=True)


if __name__ == "__main__":
    main()
