"""Memory tiers: demote/recall throughput against memcpy and raw file I/O measured in the
same run, and how much of a recall prefetch hides behind compute.

Run: python benchmarks/tiers.py [--quick]

Every tier path is compared with the plain operation moving the same bytes: hot<->host
with a torch copy of one large tensor (memcpy), host->disk with plain `f.write` of each
page's bytes to its own file (same fsync policy as the store, no header, checksum or
rename), disk->hot with plain `readinto` of those files into a preallocated buffer, both
from the page cache and cold (our files evicted with posix_fadvise). Target: each path >= 70%
of its baseline.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
import zlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

import ringmem
from ringmem.cache.tiers import TierPolicy, TierStore, TransferEngine
from ringmem.cache.tiers.records import raw_bytes

from _common import git_commit, machine

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TARGET = 0.70


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pages", type=int, default=256, help="pages moved per measurement")
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--page-size", type=int, default=256)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--repeats", type=int, default=5, help="best of this many runs")
    p.add_argument("--fsync", action="store_true", help="fsync every page file (and dir)")
    p.add_argument("--layers", type=int, default=8, help="layers in the prefetch test")
    p.add_argument("--recall-pages", type=int, default=32, help="pages recalled per layer")
    p.add_argument("--disk-dir", default=None, help="where page files go (default: a tmp dir)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: OpenMP copies collapse on a loaded 2-core box)")
    p.add_argument("--out", default="benchmarks/results/tiers.md")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    a = p.parse_args()
    if a.quick:
        a.pages, a.repeats, a.layers, a.recall_pages = 32, 2, 4, 8
    return a


def runs(fn: Callable[[], Any], repeats: int,
         setup: Callable[[], Any] | None = None) -> list[float]:
    """Wall times of fn over `repeats` runs (setup, untimed, before each)."""
    times = []
    for _ in range(repeats):
        if setup:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def best(fn: Callable[[], Any], repeats: int, setup: Callable[[], Any] | None = None) -> float:
    """Fastest wall time of fn over `repeats` runs (setup, untimed, before each)."""
    return min(runs(fn, repeats, setup))


def hot_pool(a: argparse.Namespace) -> dict[str, torch.Tensor]:
    """A PagedStore-like pool holding a.pages full pages (head-major)."""
    g = torch.Generator().manual_seed(0)
    slots, h, d = a.pages * a.page_size, a.kv_heads, a.dim
    dt = DTYPES[a.dtype]
    return {"k": torch.randn(h, slots, d, generator=g).to(dt),
            "v": torch.randn(h, slots, d, generator=g).to(dt),
            "pos": torch.arange(slots).expand(h, slots).contiguous(),
            "score": torch.rand(h, slots, generator=g)}


def page_of(pool: dict[str, torch.Tensor], i: int, ps: int) -> tuple[torch.Tensor, ...]:
    sl = slice(i * ps, (i + 1) * ps)
    return pool["k"][:, sl], pool["v"][:, sl], pool["pos"][:, sl], pool["score"][:, sl]


def make_store(a: argparse.Namespace, root: str, host: int | None = None,
               disk: int | None = None) -> TierStore:
    policy = TierPolicy(host_pages=a.pages if host is None else host,
                        disk_pages=a.pages if disk is None else disk, disk_dir=root,
                        fsync=a.fsync)
    return TierStore(policy, kv_heads=a.kv_heads, head_dim=a.dim, page_size=a.page_size,
                     dtype=DTYPES[a.dtype])


def memcpy_bw(nbytes: int, repeats: int) -> list[float]:
    """Bytes/s of each of repeats + 2 copies of nbytes."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    return [nbytes / t for t in runs(lambda: dst.copy_(src), repeats + 2)]


def crc32_bw(nbytes: int, repeats: int) -> list[float]:
    """Bytes/s of zlib.crc32 (the records' checksum) over nbytes on this thread, per run."""
    buf = memoryview(torch.ones(nbytes, dtype=torch.uint8).numpy())
    return [nbytes / t for t in runs(lambda: zlib.crc32(buf), repeats + 2)]


def raw_write(pages: list[list[torch.Tensor]], root: Path, fsync: bool) -> None:
    for i, parts in enumerate(pages):
        with open(root / f"raw{i}", "wb") as f:
            for t in parts:
                f.write(raw_bytes(t))
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    if fsync:
        fd = os.open(root, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def raw_read(n: int, dest: torch.Tensor, root: Path) -> None:
    """Read the raw page files back to back into one preallocated destination buffer (the
    same bytes recall_into lands in its hot buffers), with the same read-ahead hint the
    store gives (so the ratio is the store's overhead, not a better access pattern)."""
    for i in range(n):
        fd = os.open(root / f"raw{i}", os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        os.close(fd)
    mv, at = raw_bytes(dest), 0
    for i in range(n):
        with open(root / f"raw{i}", "rb") as f:
            at += f.readinto(mv[at:])


def drop_cache(root: Path) -> None:
    """Evict our own files from the page cache (synced first, so the pages are clean):
    the next read comes from the drive. Touches no other file."""
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def throughput(a: argparse.Namespace, root: Path, tick: Callable[[str], None]) -> dict:
    s = make_store(a, str(root / "store"))
    page = s.page_bytes(a.page_size)
    total = a.pages * page
    pool = hot_pool(a)
    keys = [(0, 0, i) for i in range(a.pages)]
    out: dict[str, Any] = {"page_bytes": page, "bytes_per_run": total, "spread": {}}

    def rate(key: str, fn: Callable[[], Any], repeats: int,
             setup: Callable[[], Any] | None = None) -> None:
        """out[key]: the best bytes/s over the repeats; out["spread"][key]: every run's."""
        out["spread"][key] = [total / t for t in runs(fn, repeats, setup)]
        out[key] = max(out["spread"][key])

    out["spread"]["memcpy"] = memcpy_bw(max(total, 256 << 20), a.repeats)
    out["memcpy"] = max(out["spread"]["memcpy"])
    out["spread"]["crc32"] = crc32_bw(max(total, 256 << 20), a.repeats)
    out["crc32"] = max(out["spread"]["crc32"])
    tick("memcpy")
    # the hot recall target: a preallocated buffer as large as the pool (what the cache
    # would attend over); recall_into packs the pages back to back into it
    dest = tuple(torch.empty_like(t) for t in (pool["k"], pool["v"], pool["pos"],
                                                  pool["score"]))

    def clear() -> None:  # steady state: segments stay allocated, slots are reused
        s.delete(s.keys())

    def demote(summarize: bool = True, batched: bool = True) -> None:
        if batched:  # one call for the whole run of pages, as the coordinator demotes
            s.demote_run(keys, *(pool[n] for n in ("k", "v", "pos", "score")),
                         summarize=summarize)
            return
        for i, key in enumerate(keys):
            s.demote(key, *page_of(pool, i, a.page_size), summarize=summarize)

    demote()  # warm: allocate and touch the host segments once
    clear()
    rate("hot_to_host", lambda: demote(False), a.repeats, clear)
    rate("hot_to_host_per_page", lambda: demote(False, False), a.repeats, clear)
    rate("hot_to_host_summary", demote, a.repeats, clear)
    tick("hot -> host")
    clear()
    demote()
    rate("host_to_hot", lambda: s.recall_into(keys, dest), a.repeats)
    rate("host_to_hot_new_tensors", lambda: s.recall(keys), a.repeats)
    tick("host -> hot")
    host_pages = [[t.contiguous() for t in p] for p in s.recall(keys)]  # the bytes spilled
    rate("host_to_disk", s.spill, a.repeats, lambda: (clear(), demote()))
    tick("host -> disk")
    rate("disk_to_hot", lambda: s.recall_into(keys, dest), a.repeats)
    rate("disk_to_hot_new_tensors", lambda: s.recall(keys), a.repeats)
    rate("disk_to_hot_cold", lambda: s.recall_into(keys, dest), a.repeats,
                                           lambda: drop_cache(s.dir))
    tick("disk -> hot")
    s.close()
    raw = root / "raw"
    raw.mkdir()
    rate("raw_write", lambda: raw_write(host_pages, raw, a.fsync), a.repeats)
    tick("raw write")
    buf = torch.zeros(total, dtype=torch.uint8)
    rate("raw_read", lambda: raw_read(a.pages, buf, raw), a.repeats)
    rate("raw_read_cold", lambda: raw_read(a.pages, buf, raw), a.repeats,
                                        lambda: drop_cache(raw))
    big = torch.cat([t.flatten().view(torch.uint8) for p in host_pages for t in p])
    (raw / "one").mkdir()
    rate("raw_write_one_file", lambda: raw_write([[big]], raw / "one", a.fsync),
                                             a.repeats)
    tick("raw read")
    shutil.rmtree(raw)
    return out


def prefetch_overlap(a: argparse.Namespace, root: Path, tick: Callable[[str], None]) -> dict:
    """Per layer: recall `recall_pages` disk pages into a preallocated hot buffer, then
    compute (matmuls about as long). Sequential vs the next layer's recall prefetched
    (double-buffered) during this layer's compute."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1))  # leave the transfer worker a core
    n, ps = a.layers * a.recall_pages, a.page_size
    store = make_store(a, str(root / "prefetch"), host=1, disk=n + 1)
    pool = hot_pool(argparse.Namespace(**{**vars(a), "pages": a.recall_pages}))
    tensors = [pool[x] for x in ("k", "v", "pos", "score")]
    for layer in range(a.layers):
        store.demote_run([(layer, 0, j) for j in range(a.recall_pages)], *tensors)
    store.demote((a.layers, 0, 0), *page_of(pool, 0, ps))  # pushes the last host page out
    layer_keys = [[(layer, 0, j) for j in range(a.recall_pages)] for layer in range(a.layers)]
    bufs = [tuple(torch.empty_like(t) for t in tensors) for _ in range(2)]
    t_x = statistics.median(best(lambda: store.recall_into(ks, bufs[0]), 1)
                            for ks in layer_keys)
    x, y = torch.randn(512, 512), torch.empty(512, 512)
    t_mm = best(lambda: torch.mm(x, x, out=y), 5)
    reps = max(1, round(t_x / t_mm))

    def compute() -> None:
        for _ in range(reps):
            torch.mm(x, x, out=y)

    t_c = best(compute, 3)
    tick("calibrate")

    compute_fn = [compute]

    spent = [0.0]  # recall time inside the last sequential run

    def sequential() -> None:
        spent[0] = 0.0
        for ks in layer_keys:
            t0 = time.perf_counter()
            store.recall_into(ks, bufs[0])
            spent[0] += time.perf_counter() - t0
            compute_fn[0]()

    def prefetched() -> None:
        with TransferEngine(store) as eng:
            h = eng.prefetch(layer_keys[0], bufs[0])
            for layer in range(a.layers):
                eng.wait(h)
                if layer + 1 < a.layers:  # into the other buffer, while this one is used
                    h = eng.prefetch(layer_keys[layer + 1], bufs[(layer + 1) % 2])
                compute_fn[0]()

    t_xfer = a.layers * t_x
    res: dict[str, Any] = {"layers": a.layers, "recall_pages": a.recall_pages,
                           "matmul_reps": reps, "transfer_s_per_layer": t_x,
                           "compute_s_per_layer": t_c, "transfer_s": t_xfer,
                           "compute_threads": max(1, threads - 1)}
    # "cpu": compute = matmuls, competing with the transfer for the cores; "device": the
    # compute leaves the CPU idle for as long (as a GPU kernel would), so this measures
    # what the engine itself can hide
    for name, fn in (("cpu", compute), ("device", lambda: time.sleep(t_c))):
        compute_fn[0] = fn
        t_seq = best(sequential, a.repeats)
        t_pre = best(prefetched, a.repeats)
        # against the recall time of a sequential run (not the calibration): what hid
        x = spent[0]
        res[name] = {"sequential_s": t_seq, "prefetched_s": t_pre, "hidden_s": t_seq - t_pre,
                     "recall_in_sequential_s": x, "hidden_fraction": (t_seq - t_pre) / x}
        tick(f"prefetch, {name} compute")
    store.close()
    torch.set_num_threads(threads)
    return res


def main() -> None:
    a = parse()
    load0 = list(os.getloadavg())  # other jobs on the machine skew every number
    torch.set_num_threads(a.threads)
    root = Path(tempfile.mkdtemp(prefix="ringmem-tiers-", dir=a.disk_dir))
    try:
        from tqdm import tqdm
        bar = tqdm(total=11)
        tick = lambda msg: (bar.set_description(msg), bar.update(1))  # noqa: E731
    except ImportError:
        bar, tick = None, lambda msg: print(msg, flush=True)
    try:
        tp = throughput(a, root, tick)
        pf = prefetch_overlap(a, root, tick)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if bar:
        bar.close()
    report(a, tp, pf, load0)


def report(a: argparse.Namespace, tp: dict, pf: dict, load0: list[float]) -> None:
    gb = lambda x: f"{x / 1e9:.2f}"  # noqa: E731
    rows = [("hot -> host: demote_run (whole run, one call)", "hot_to_host", "memcpy"),
            ("hot -> host: demote, page by page", "hot_to_host_per_page", "memcpy"),
            ("hot -> host: demote_run + key min/max summaries", "hot_to_host_summary",
             "memcpy"),
            ("host -> hot: recall_into buffer", "host_to_hot", "memcpy"),
            ("host -> hot: recall, new tensors", "host_to_hot_new_tensors", "memcpy"),
            ("host -> disk: spill (header, CRC-32, write, rename)", "host_to_disk",
             "raw_write"),
            ("disk -> hot: recall_into (read, verify, copy), cached", "disk_to_hot",
             "raw_read"),
            ("disk -> hot: recall, new tensors, cached", "disk_to_hot_new_tensors",
             "raw_read"),
            ("disk -> hot: recall_into, cold (evicted from page cache)", "disk_to_hot_cold",
             "raw_read_cold")]
    spread = lambda k: "{:.2f}-{:.2f}".format(*(f(tp["spread"][k]) / 1e9  # noqa: E731
                                                for f in (min, max)))
    lines = [f"| path | GB/s (best of {a.repeats}) | GB/s, every run (min-max) | baseline | "
             "baseline GB/s | ratio | target >= 70% |", "|---|---|---|---|---|---|---|"]
    result = []
    for name, key, base in rows:
        r = tp[key] / tp[base]
        result.append({"path": key, "bytes_per_s": tp[key], "baseline": base,
                       "baseline_bytes_per_s": tp[base], "ratio": r})
        lines.append(f"| {name} | {gb(tp[key])} | {spread(key)} | {base} | {gb(tp[base])} | "
                     f"{r:.2f} | {'PASS' if r >= TARGET else 'FAIL'} |")
    ptab = [f"Per layer: recall {pf['recall_pages']} disk pages into a hot buffer "
            f"({1e3 * pf['transfer_s_per_layer']:.2f} ms), then compute "
            f"({1e3 * pf['compute_s_per_layer']:.2f} ms); {pf['layers']} layers.", "",
            "| compute | recall then compute (s) | of which recall (s) | next layer "
            "prefetched (s) | hidden (s) | hidden / recall (at most (L-1)/L = "
            f"{(pf['layers'] - 1) / pf['layers']:.0%}) |", "|---|---|---|---|---|---|"]
    for name, what in (("cpu", f"{pf['matmul_reps']} x 512^2 matmul on the CPU"),
                       ("device", "idle CPU for as long (as under a GPU kernel)")):
        r = pf[name]
        ptab.append(f"| {what} | {r['sequential_s']:.4f} | {r['recall_in_sequential_s']:.4f} | "
                    f"{r['prefetched_s']:.4f} | "
                    f"{r['hidden_s']:.4f} | {100 * r['hidden_fraction']:.0f}% |")
    cfg = dict(vars(a))
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), "cuda": torch.cuda.is_available(),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "ringmem": ringmem.__version__, "git": git_commit()},
            "config": cfg, "torch_threads": torch.get_num_threads(),
            "load_average_start_end": [load0, list(os.getloadavg())]}
    m = meta["machine"]
    page_mib = tp["page_bytes"] / 2**20
    md = "\n".join([
        "# Memory tiers: transfer throughput and prefetch overlap", "",
        f"- date: {meta['date']}",
        f"- machine: {m['platform']}, {m['cpu']}, {m['cpu_count']} cpus, CUDA: {meta['cuda']}",
        f"- versions: {meta['versions']}", f"- config: {cfg}",
        f"- page: {a.kv_heads} KV heads x {a.page_size} tokens x {a.dim} dims, {a.dtype}, "
        f"with positions and scores = {page_mib:.2f} MiB; {a.pages} pages "
        f"({tp['bytes_per_run'] / 2**20:.0f} MiB) per run, best of {a.repeats}",
        f"- memcpy: {gb(tp['memcpy'])} GB/s (runs: {spread('memcpy')}); CRC-32 (zlib.crc32, "
        f"the page records' checksum, one thread): {gb(tp['crc32'])} GB/s (runs: "
        f"{spread('crc32')})",
        f"- raw write of the same bytes as one file: {gb(tp['raw_write_one_file'])} GB/s; "
        f"fsync: {a.fsync}; torch threads: {a.threads}",
        "- cached: the files were just written and sit in the page cache (the store's "
        "overhead); cold: our files evicted with posix_fadvise(DONTNEED) before each run "
        "(the drive)", "",
        "## Throughput vs baselines measured in this run", "", *lines, "",
        "## Prefetch: next layer's recall during this layer's compute", "", *ptab, "",
        f"Compute ran on {pf['compute_threads']} thread(s), leaving the transfer worker a core "
        f"when the machine is otherwise idle; the first layer's recall cannot hide.",
        "", "## Notes", "",
        "- The key min/max summary is compute, not transfer: two reductions over every "
        "demoted key (bf16 reduces at a few GB/s on one CPU core). On a GPU it runs on the "
        "hot device at HBM speed, far above the PCIe copy it accompanies.",
        f"- Verified disk reads from the page cache are bound by CRC-32 (zlib, "
        f"{gb(tp['crc32'])} GB/s on one core in this run), below a page-cache read "
        f"({gb(tp['raw_read'])} GB/s); from the drive (cold) the checksum "
        "hides behind the I/O. Spill computes the CRC on a helper thread while writing.",
        "- `recall` returns new tensors: on CPU each allocation page-faults fresh memory, "
        "which dominates when it happens; `recall_into` (preallocated hot buffers, "
        "reused staging) is the path for throughput.",
        f"- Load average (1, 5, 15 min) at start {load0}, at end "
        f"{meta['load_average_start_end'][1]}: other jobs shared the "
        f"{m['cpu_count']} cores.", ""])
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    out.with_suffix(".json").write_text(json.dumps(
        {**meta, "throughput": result, "raw": tp, "prefetch": pf}, indent=2) + "\n")
    print("\n".join(lines + [""] + ptab), flush=True)
    print(f"wrote {out}, {out.with_suffix('.json')}", flush=True)


if __name__ == "__main__":
    main()
