"""A 1,048,576-token context on one CPU machine: 4 ranks, hot / host / disk memory tiers.

Run: python benchmarks/million.py [--quick]   (spawns its own gloo ranks)

Synthetic K/V (8 query heads, 2 KV heads, D=64, bf16, one layer) are filled through the
low-level path, not prefill: each round every rank appends its stripe of the next
`--fill-chunk` tokens (`extend_local` + `sync`), then `compress()` keeps the `--hot-tokens`
most recent (StreamingLLM, per KV head over all ranks) and demotes the rest to the host
tier, which spills its least recently used pages to disk. (A real prefill of 1M tokens is
quadratic: hours on 2 cores.) A needle key aligned with the decode query sits at a random
position that ends up demoted. Decode then recalls, per rank and step, the `--recall`
pages whose Quest bound is highest (prefetched on the transfer worker).

Reported: decode latency per token (slowest rank), whether the needle's page is recalled,
the first step's error against exact attention over all 1M tokens (accumulated during the
fill, fp32), memory per tier over time, and peak RSS per rank against `--cap-gib`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist

import ringmem
from ringmem.cache import CacheConfig, ShardedKVCache, TierPolicy
from ringmem.eviction import EvictionPolicy, StreamingLLM
from ringmem.testing import spawn

from _common import git_commit, machine

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GIB = 2 ** 30


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1 << 20)
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--q-heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--page-size", type=int, default=256)
    p.add_argument("--hot-tokens", type=int, default=65536,
                   help="hot budget per KV head over all ranks (eviction budget)")
    p.add_argument("--host-fraction", type=float, default=0.25,
                   help="share of each rank's demoted pages the host tier holds")
    p.add_argument("--fill-chunk", type=int, default=65536, help="tokens per fill round")
    p.add_argument("--recall", type=int, default=32, help="pages recalled per rank per step")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--no-prefetch", action="store_true", help="recall synchronously")
    p.add_argument("--cap-gib", type=float, default=8.0,
                   help="cap on total resident memory (sum of peak RSS over ranks)")
    p.add_argument("--disk-dir", default=None, help="disk tier root (default: a temp dir)")
    p.add_argument("--query-norm", type=float, default=4.0,
                   help="|q| of the decode queries (keys are N(0, 1) per channel)")
    p.add_argument("--needle-logit", type=float, default=19.0,
                   help="the needle's scaled score q.k/sqrt(D) (the 1M random keys' total "
                        "mass is about e^14 at the default query norm)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/million.md")
    p.add_argument("--quick", action="store_true", help="262,144 tokens, 8 steps")
    a = p.parse_args()
    if a.quick:
        a.tokens, a.steps, a.hot_tokens, a.fill_chunk = 1 << 18, 8, 16384, 32768
    for name in ("tokens", "world", "hot_tokens", "fill_chunk", "steps", "page_size"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got "
                             f"{getattr(a, name)}")
    if a.tokens % a.fill_chunk or a.fill_chunk % a.world:
        raise ValueError(f"--tokens {a.tokens} must be a multiple of --fill-chunk "
                         f"{a.fill_chunk}, itself a multiple of --world {a.world}")
    if not 0 <= a.host_fraction <= 1:
        raise ValueError(f"--host-fraction must be in [0, 1], got {a.host_fraction}")
    return a


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def slowest(fn) -> tuple[float, object]:
    """Wall time of fn on the slowest rank, all ranks starting together; fn's result."""
    dist.barrier()
    t0 = time.perf_counter()
    out = fn()
    dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(dt, op=dist.ReduceOp.MAX)
    return dt.item(), out


class Exact:
    """Online-softmax partial of a fixed query over every token this rank ever held (fp32),
    accumulated while the K/V are generated: the reference for decode step 0."""

    def __init__(self, q: torch.Tensor, kv_heads: int, scale: float) -> None:
        hq, d = q.shape
        self.qg = (q.float() * scale).reshape(kv_heads, hq // kv_heads, d)
        self.m = torch.full(self.qg.shape[:2], float("-inf"))
        self.l = torch.zeros(self.qg.shape[:2])
        self.acc = torch.zeros(self.qg.shape)

    def add(self, k: torch.Tensor, v: torch.Tensor) -> None:  # k, v [n, Hkv, D]
        s = torch.einsum("hgd,nhd->hgn", self.qg, k.float())
        m = torch.maximum(self.m, s.amax(-1))
        a = torch.exp(self.m - m)
        p = torch.exp(s - m[..., None])
        self.l = self.l * a + p.sum(-1)
        self.acc = self.acc * a[..., None] + torch.einsum("hgn,nhd->hgd", p, v.float())
        self.m = m

    def lse(self) -> torch.Tensor:
        return (self.m + self.l.log()).flatten()

    def out(self) -> torch.Tensor:
        return (self.acc / self.l[..., None]).flatten(0, 1)


def plan(a: argparse.Namespace, base_rss: int) -> dict[str, int]:
    """Per-rank capacities, and the resident memory they imply (checked against the cap)."""
    dt = DTYPES[a.dtype]
    per = a.tokens // a.world
    hot = -(-(a.hot_tokens // a.world + a.fill_chunk // a.world + a.steps) // a.page_size
            ) * a.page_size + 4 * a.page_size  # + slack: ranks hold unequal shares
    page_bytes = a.kv_heads * a.page_size * (2 * a.dim * dt.itemsize + 12)
    pages = -(-per // a.page_size) + 8  # + partial pages of unequal per-head evictions
    host = math.ceil(a.host_fraction * pages)
    token_bytes = a.kv_heads * (2 * a.dim * dt.itemsize + 12)
    # pool + host tier + a fill round's K/V, its evicted clones and one packed group
    est = base_rss + hot * token_bytes + host * page_bytes + 3 * (a.fill_chunk // a.world) \
        * token_bytes + 64 * page_bytes
    return {"hot_capacity": hot, "host_pages": host, "disk_pages": pages - host + 8,
            "page_bytes": page_bytes, "estimate_bytes": est * a.world}


def run(rank: int, world: int, a: argparse.Namespace) -> None:
    torch.manual_seed(a.seed)
    dt, t_start = DTYPES[a.dtype], time.perf_counter()
    p = plan(a, rss_bytes())
    if p["estimate_bytes"] > a.cap_gib * GIB:
        raise ValueError(f"planned resident memory {p['estimate_bytes'] / GIB:.2f} GiB exceeds "
                         f"--cap-gib {a.cap_gib}: lower --hot-tokens or --host-fraction")
    disk_root = tempfile.TemporaryDirectory(dir=a.disk_dir, prefix="ringmem-million-")
    cfg = CacheConfig(num_layers=1, q_heads=a.q_heads, kv_heads=a.kv_heads, head_dim=a.dim,
                      capacity=p["hot_capacity"], page_size=a.page_size, dtype=dt)
    pol = EvictionPolicy(scorer=StreamingLLM(), budget=a.hot_tokens, sinks=4, recent=256)
    tiers = TierPolicy(host_pages=p["host_pages"], disk_pages=p["disk_pages"],
                       disk_dir=disk_root.name, recall=a.recall, prefetch=not a.no_prefetch)
    cache = ShardedKVCache(cfg, eviction=pol, tiers=tiers)
    shared = torch.Generator().manual_seed(a.seed)  # the same draws on every rank
    u = torch.randn(a.dim, generator=shared)
    u /= u.norm()
    needle = int(torch.randint(a.tokens // 8, a.tokens - 2 * a.hot_tokens, (1,),
                               generator=shared))
    scale = a.dim ** -0.5
    k_needle = a.needle_logit * math.sqrt(a.dim) / a.query_norm * u
    qs = [(a.query_norm * u + 0.05 * torch.randn(a.q_heads, a.dim, generator=shared)).to(dt)
          for _ in range(a.steps + 1)]
    new_kv = [[torch.randn(1, 1, a.kv_heads, a.dim, generator=shared).to(dt)
               for _ in range(2)] for _ in range(a.steps + 1)]
    exact = Exact(qs[0], a.kv_heads, scale)
    timeline: list[dict] = []

    def sample(phase: str) -> None:
        st, store = cache.tier_stats(), cache.stores[0]
        timeline.append({"t": time.perf_counter() - t_start, "phase": phase,
                         "rss": rss_bytes(), "hot_used": sum(map(len, store.tables))
                         * a.page_size * a.kv_heads * (2 * a.dim * dt.itemsize + 12),
                         "pending": st["pending_bytes"], "summaries": st["summary_bytes"],
                         "host": st["host_bytes"], "disk": st["disk_bytes"],
                         "host_pages": st["host_pages"], "disk_pages": st["disk_pages"]})

    from tqdm import tqdm
    bar = tqdm(total=a.tokens // a.fill_chunk + a.steps + 1, disable=rank != 0,
               desc="fill", unit="step")
    g = torch.Generator().manual_seed(a.seed + 1 + rank)
    n = a.fill_chunk // world
    for lo in range(0, a.tokens // world, n):
        pos = (lo + torch.arange(n)) * world + rank  # stripe: token t lives on t % world
        k, v = (torch.randn(n, a.kv_heads, a.dim, generator=g).to(dt) for _ in range(2))
        hit = (pos == needle).nonzero().flatten()
        if hit.numel():  # the needle: a key along the query, a value to recognise
            k[hit], v[hit] = k_needle.to(dt), torch.full((a.kv_heads, a.dim), 3.0).to(dt)
        exact.add(k, v)
        cache.extend_local(0, 0, k, v, pos)
        cache.sync()
        cache.compress()
        sample("fill")
        bar.update(1)
    bar.set_description("decode")
    # exact step-0 reference: every rank's partial plus the new token, merged
    rows = [None] * world
    dist.all_gather_object(rows, (exact.out(), exact.lse()))
    outs, lses = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
    k0, v0 = (t[0, 0].float().repeat_interleave(a.q_heads // a.kv_heads, 0) for t in new_kv[0])
    l_new = (qs[0].float() * scale * k0).sum(-1)
    lse_all = torch.logsumexp(torch.cat([lses, l_new[None]]), 0)
    ref = (outs * torch.exp(lses - lse_all)[..., None]).sum(0) + \
        v0 * torch.exp(l_new - lse_all)[:, None]
    l_needle = (qs[0].float() * scale * k_needle.to(dt).float()).sum(-1)
    needle_mass = float(torch.exp(l_needle - lse_all).min())  # over the query heads
    steps = []
    for i in range(a.steps + 1):
        q = qs[i][None, None]
        dt_s, out = slowest(lambda: cache.decode(0, q, *new_kv[i]))
        keys = cache.tiers.selected[(0, 0)]
        pages = cache.tiers.store.recall(keys) if keys else []
        found = torch.tensor([int(any(bool((pg.pos == needle).any()) for pg in pages))])
        dist.all_reduce(found)
        step = {"step": i, "ms": 1e3 * dt_s, "needle_recalled": bool(found.item())}
        if i == 0:
            step["max_abs_err_vs_exact"] = float((out[0, 0].float() - ref).abs().max())
            step["needle_value_err"] = float((out[0, 0].float() - 3.0).abs().max())
        steps.append(step)
        sample("decode")
        bar.update(1)
    bar.close()
    st = cache.tier_stats()
    mine = {"rank": rank, "peak_rss": peak_rss_bytes(), "timeline": timeline, "stats": st,
            "hot_held": cache.rank_counts()[rank]}
    cache.close()
    disk_root.cleanup()
    ranks = [None] * world
    dist.all_gather_object(ranks, mine)
    if rank == 0:
        report(a, p, steps, ranks, needle, needle_mass, time.perf_counter() - t_start)


def plot(ranks: list[dict], steps: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    tl = ranks[0]["timeline"]
    t = [s["t"] for s in tl]
    for key, label in (("rss", "resident (RSS)"), ("hot_used", "hot pages in use"),
                       ("host", "host tier"), ("disk", "disk tier"),
                       ("pending", "pending (hot)"), ("summaries", "summaries (hot)")):
        tot = [sum(r["timeline"][i][key] for r in ranks) / 2 ** 20 for i in range(len(tl))]
        ax1.plot(t, tot, label=label)
    fill_end = max(s["t"] for s in tl if s["phase"] == "fill")
    ax1.axvline(fill_end, color="gray", ls=":", label="fill -> decode")
    ax1.set_xlabel("seconds since start")
    ax1.set_ylabel("MiB, all ranks")
    ax1.set_yscale("symlog", linthresh=1)
    ax1.set_ylim(bottom=0)
    ax1.set_title("memory per tier over time")
    ax1.legend(fontsize=8)
    ax2.plot([s["step"] for s in steps[1:]], [s["ms"] for s in steps[1:]], "o-")
    ax2.set_xlabel("decode step")
    ax2.set_ylabel("ms per token (slowest rank)")
    ax2.set_title(f"decode latency, {len(ranks)} ranks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(a: argparse.Namespace, p: dict, steps: list[dict], ranks: list[dict],
           needle: int, needle_mass: float, seconds: float) -> None:
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lat = [s["ms"] for s in steps[1:]]  # step 0 is the warm-up
    peak = [r["peak_rss"] for r in ranks]
    last = [r["timeline"][-1] for r in ranks]
    mib = 2 ** 20
    tab = ["| metric | value |", "|---|---|",
           f"| context | {a.tokens:,} tokens over {a.world} ranks |",
           f"| decode ms/token: median (min, max) | {statistics.median(lat):.1f} "
           f"({min(lat):.1f}, {max(lat):.1f}) |",
           f"| needle page recalled | {sum(s['needle_recalled'] for s in steps)}/{len(steps)} "
           f"steps |",
           f"| step-0 max abs error vs exact attention over all {a.tokens:,} tokens | "
           f"{steps[0]['max_abs_err_vs_exact']:.2e} (the needle's value is 3.0: without it, "
           f"~3) |",
           f"| needle's exact attention mass (min over q heads) | {needle_mass:.4f} |",
           f"| hot tokens held / rank (end) | {', '.join(str(r['hot_held']) for r in ranks)} |",
           f"| hot pages in use, all ranks (end) | "
           f"{sum(x['hot_used'] for x in last) / mib:.1f} MiB |",
           f"| pending + summaries (hot), all ranks | "
           f"{sum(x['pending'] + x['summaries'] for x in last) / mib:.1f} MiB |",
           f"| host tier, all ranks (end) | {sum(x['host'] for x in last) / mib:.1f} MiB in "
           f"{sum(x['host_pages'] for x in last)} pages (cap {p['host_pages']}/rank) |",
           f"| disk tier, all ranks (end) | {sum(x['disk'] for x in last) / mib:.1f} MiB in "
           f"{sum(x['disk_pages'] for x in last)} pages (cap {p['disk_pages']}/rank) |",
           f"| peak RSS per rank | {', '.join(f'{x / mib:.0f}' for x in peak)} MiB |",
           f"| peak RSS, sum | {sum(peak) / GIB:.2f} GiB (cap {a.cap_gib} GiB: "
           f"{'under' if sum(peak) <= a.cap_gib * GIB else 'OVER'}) |",
           f"| pages recalled / from prefetch | "
           f"{sum(r['stats']['recalled_pages'] for r in ranks)} / "
           f"{sum(r['stats']['prefetched_used'] for r in ranks)} |",
           f"| wall time (fill + decode) | {seconds:.0f} s |"]
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), "load_average_end": [round(x, 2) for x in os.getloadavg()],
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "ringmem": ringmem.__version__, "git": git_commit()},
            "config": {**vars(a), **{k: v for k, v in p.items()}, "threads_per_rank": 1,
                       "needle_position": needle, "fill": "extend_local + sync + compress"}}
    png = out.with_suffix(".png")
    plot(ranks, steps, png)
    md = "\n".join([
        "# A million-token context across hot / host / disk tiers", "",
        f"- date: {meta['date']}", f"- machine: {meta['machine']}",
        f"- load average (1, 5, 15 min) at the end: {meta['load_average_end']} (other jobs "
        "on the machine skew every timing)",
        f"- versions: {meta['versions']}", f"- config: {meta['config']}", "",
        "Filled through `extend_local` + `sync` + `compress()` per round (not prefill); "
        "StreamingLLM keeps the hot budget, the rest is demoted (host, LRU spill to disk). "
        "Decode recalls per rank the pages with the highest Quest bound. Step 0 is the "
        "warm-up (not in the latency); its output is compared with exact fp32 attention "
        "over all tokens.", "", *tab, "", f"![memory per tier and decode latency]({png.name})",
        ""])
    out.write_text(md)
    out.with_suffix(".json").write_text(json.dumps(
        {**meta, "steps": steps, "ranks": [{k: v for k, v in r.items()} for r in ranks],
         "needle_mass": needle_mass, "seconds": seconds}, indent=1) + "\n")
    print("\n".join(tab), flush=True)
    print(f"wrote {out}, {out.with_suffix('.json')}, {png}", flush=True)


def main() -> None:
    a = parse()
    spawn(run, a.world, a, threads=1, timeout=900)


if __name__ == "__main__":
    main()
