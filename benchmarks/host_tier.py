"""Host-tier attention in place vs recall-and-copy, over the same demoted pages.

Run: python benchmarks/host_tier.py [--quick] [--device cuda]

One (layer, sequence) with --pages demoted pages in a `TierStore`'s host tier. Per decode
query:
* recall: the `--recall` pages copied to the hot device (`TierStore.recall`, what
  attend="recall" moves each step) and attended there: approximate (the other pages are
  left out) — and, for the exactness check, recall of every page;
* host: every page attended where it lives by the compiled CPU kernel
  (`tiers/hostattend.host_partial`, attend="host"): exact; only the partial crosses.
Reported: bytes over the link per query, time (median, min-max of --repeats), and the max
|error| of each against float64 attention over every demoted entry.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from _common import git_commit, machine

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def timed(fn, repeats: int) -> list[float]:
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pages", type=int, default=512)
    p.add_argument("--recall", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--page-size", type=int, default=256)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--device", default="cpu", help="the hot device (cpu or cuda)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="benchmarks/results/host_tier.md")
    a = p.parse_args()
    if a.quick:
        a.pages, a.recall, a.repeats = 32, 4, 2
    torch.set_num_threads(a.threads)
    from ringmem.cache.tiers import TierPolicy, TierStore
    from ringmem.cache.tiers.hostattend import host_partial
    from ringmem.partial import attend, merge
    dt, hkv, d, ps = DTYPES[a.dtype], a.kv_heads, a.dim, a.page_size
    store = TierStore(TierPolicy(host_pages=a.pages, attend="host"), kv_heads=hkv,
                      head_dim=d, page_size=ps, dtype=dt, hot_device=a.device)
    g = torch.Generator().manual_seed(0)
    ks, vs = [], []
    for i in range(a.pages):
        k = torch.randn(hkv, ps, d, generator=g).to(dt)
        v = torch.randn(hkv, ps, d, generator=g).to(dt)
        pos = torch.arange(i * ps, (i + 1) * ps).expand(hkv, ps)
        store.demote((0, 0, i), k.to(a.device), v.to(a.device), pos.to(a.device))
        ks.append(k)
        vs.append(v)
    q = torch.randn(a.q_heads, d, generator=g).to(dt).to(a.device)
    scale = d ** -0.5
    keys = [(0, 0, i) for i in range(a.pages)]

    def recall(n: int):
        pages = store.recall(keys[:n])
        return merge([attend(q, pg.k, pg.v, scale) for pg in pages])
    rec = timed(lambda: recall(a.recall), a.repeats)
    host = timed(lambda: host_partial(store, 0, 0, q, scale), a.repeats)
    # exactness: float64 over every entry
    K, V = torch.cat(ks, 1).double(), torch.cat(vs, 1).double()
    grp = a.q_heads // hkv
    s = (q.double().cpu().reshape(hkv, grp, d) * scale) @ K.transpose(1, 2)
    ref = (s.softmax(-1) @ V).reshape(a.q_heads, d)
    got = host_partial(store, 0, 0, q, scale)[0].out.double().cpu()
    everything = recall(a.pages).out.double().cpu()
    few = recall(a.recall).out.double().cpu()
    page_bytes = hkv * ps * 2 * d * k.element_size()
    res = {"recall_s": rec, "host_s": host, "recall_bytes": a.recall * page_bytes,
           "host_link_bytes": a.q_heads * (d + 1) * 4, "host_read_bytes": a.pages * page_bytes,
           "err_host": (got - ref).abs().max().item(),
           "err_recall_all": (everything - ref).abs().max().item(),
           "err_recall_budget": (few - ref).abs().max().item()}
    cfg = {k2: v2 for k2, v2 in vars(a).items() if k2 != "out"}
    info = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "commit": git_commit(), "machine": machine(), "torch": torch.__version__,
            "config": cfg, **res}
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps(info, indent=1))
    ms = {n: [x * 1e3 for x in res[f"{n}_s"]] for n in ("recall", "host")}
    lines = ["# Host-tier attention in place vs recall-and-copy", "",
             f"- date: {info['date']}, commit {info['commit']}",
             f"- machine: {info['machine']}; torch {torch.__version__}",
             f"- config: {cfg}", "",
             "| path | pages attended | bytes over the link per query | ms (median, min-max) "
             "| max abs error vs float64 over every page |", "|---|---|---|---|---|",
             f"| recall ({a.recall} best pages) | {a.recall} | {res['recall_bytes']:,} | "
             f"{statistics.median(ms['recall']):.2f} ({min(ms['recall']):.2f}-"
             f"{max(ms['recall']):.2f}) | {res['err_recall_budget']:.2e} (pages left out) |",
             f"| host, in place | {a.pages} | {res['host_link_bytes']:,} (the partial) | "
             f"{statistics.median(ms['host']):.2f} ({min(ms['host']):.2f}-"
             f"{max(ms['host']):.2f}) | {res['err_host']:.2e} |", "",
             f"Recalling all {a.pages} pages instead: max error {res['err_recall_all']:.2e} "
             f"(the torch path). Pages here are taken in page order (the recall path's "
             f"ranking is not timed)."]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    store.close()


if __name__ == "__main__":
    main()
