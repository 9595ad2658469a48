"""`TierStore`: one rank's tiers below the hot KV pages, host (`host.HostPool`) and disk.

Pages (`host.Page`: n <= page_size slots of one `PagedStore` page) are keyed by (layer,
seq, page_id). `demote` moves a page from the hot tier (the cache's device) down to host; a
full host tier spills its least recently used page to disk; only `delete` (or the opt-in
disk_full="drop_lru") ever discards a page. `recall` copies pages back bit-exactly. A
Quest-style summary of each demoted page's keys stays on the hot device (`summaries`), so
a query can pick the pages worth recalling without touching slow tiers.

Disk pages (one `records.write_page` file each, under <disk_dir>/rank<rank>/, see
`disk.DiskFiles`) are renamed into place whole and checked on every read (magic, length,
CRC-32, that the file holds the page asked for): a mismatch raises `PageCorruptError`
naming the file. Public methods hold one lock, so the transfer worker and the caller can
share a store (ranking never waits for I/O: the summaries have their own lock).

With pages on CUDA every copy between host and device is issued non_blocking on the
caller's current stream and completes asynchronously (the rules in `staging`): run a call
under a side stream to keep the copies off the compute stream.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from itertools import accumulate
from pathlib import Path

import torch
from torch import Tensor

from .disk import DiskFiles
from .host import HostPool, Page
from .policy import TierPolicy, check_count
from .records import DTYPE_NAMES
from .summaries import PageKey, PageSummaries

TIERS = ("host", "disk")
DISK_FULL = ("error", "drop_lru")


class TierStore:
    """Host and disk tiers of demoted K/V pages for one rank (all layers, all sequences).

    policy: capacities, segment size, disk directory, fsync (recall and prefetch are for
    `TieredPages`). kv_heads, head_dim, page_size, dtype: the pages' dims. rank: pages go to
    <disk_dir>/rank<rank>/; hot_device: of the summaries and recalls (the cache's). disk_full:
    "error" (a page bound for a full disk tier raises, nothing changes) or "drop_lru" (the
    least recently used disk page is dropped, counted in stats()["dropped"]). pin_memory:
    pin host segments (fast, asynchronous GPU copies); None: when CUDA is available.
    """

    def __init__(self, policy: TierPolicy, *, kv_heads: int, head_dim: int, page_size: int,
                 dtype: torch.dtype, rank: int = 0, hot_device: str | torch.device = "cpu",
                 disk_full: str = "error", pin_memory: bool | None = None) -> None:
        if not isinstance(policy, TierPolicy):
            raise TypeError(f"policy must be a TierPolicy, got {type(policy).__name__}")
        for name, val in (("kv_heads", kv_heads), ("head_dim", head_dim),
                          ("page_size", page_size), ("rank", rank)):
            check_count(name, val, positive=name != "rank")
        if dtype not in DTYPE_NAMES or dtype == torch.int64:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        if disk_full not in DISK_FULL:
            raise ValueError(f"disk_full must be one of {DISK_FULL}, got {disk_full!r}")
        if pin_memory is not None and not isinstance(pin_memory, bool):
            raise TypeError(f"pin_memory must be a bool or None, got {pin_memory!r}")
        p = self.policy = policy
        self.kv_heads, self.head_dim, self.page_size = kv_heads, head_dim, page_size
        self.dtype = dtype
        self.rank, self.hot_device, self.disk_full = rank, torch.device(hot_device), disk_full
        self.pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._lock = threading.RLock()
        self._pool = HostPool(capacity=p.host_pages, segment_pages=p.segment_pages,
                              kv_heads=kv_heads, page_size=page_size, head_dim=head_dim,
                              dtype=dtype, pin=self.pin)
        self._host: OrderedDict[PageKey, tuple[int, int]] = OrderedDict()  # -> slot, n (LRU)
        self._disk: OrderedDict[PageKey, int] = OrderedDict()  # -> n (LRU order)
        self._files = DiskFiles(Path(p.disk_dir) / f"rank{rank:05d}", kv_heads=kv_heads,
                                head_dim=head_dim, dtype=dtype,
                                page_bytes=self.page_bytes(page_size), pin=self.pin,
                                fsync=p.fsync) if p.disk_pages else None
        self.dir = None if self._files is None else self._files.dir
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        self.summaries = PageSummaries(kv_heads, head_dim, device=self.hot_device, dtype=acc)
        self._stats = {"dropped": 0, **{f"{d}_{x}": 0 for d in
                       ("hot_to_host", "host_to_disk", "disk_to_hot", "host_to_hot")
                       for x in ("bytes", "pages", "seconds")}}

    def page_bytes(self, n: int) -> int:
        """Bytes of a page of n slots: K, V, positions and scores."""
        return self.kv_heads * n * (2 * self.head_dim * self.dtype.itemsize + 8 + 4)

    # ---------------------------------------------------------------- queries
    def tier_of(self, key: PageKey) -> str | None:
        """"host", "disk", or None when the store does not hold `key`."""
        with self._lock:
            return "host" if key in self._host else "disk" if key in self._disk else None

    def keys(self, tier: str | None = None) -> list[PageKey]:
        """Keys held in `tier` (both tiers when None), least recently used first."""
        if tier not in (None, *TIERS):
            raise ValueError(f"tier must be one of {TIERS} or None, got {tier!r}")
        with self._lock:
            return [k for t in TIERS if tier in (None, t)
                    for k in (self._host if t == "host" else self._disk)]

    def host_pages(self, layer: int, seq: int) -> list[tuple[int, Page, int]]:
        """(segment index, its [S, Hkv, P, ...] tensors, slot in it) of each host-tier page
        of (layer, seq) in page-id order, once no device copy touches them (the host
        reads them in place next: `hostattend`)."""
        with self._lock:
            got = sorted((k[2], v[0]) for k, v in self._host.items() if k[:2] == (layer, seq))
            self._pool.wait([slot for _, slot in got])
            n = self._pool.seg_n
            return [(slot // n, self._pool.segments[slot // n], slot % n) for _, slot in got]

    def __len__(self) -> int:
        return len(self._host) + len(self._disk)

    def stats(self) -> dict[str, float]:
        """Pages and bytes per tier, capacities, allocated host bytes, and the bytes, pages
        and seconds moved along each path (hot_to_host, host_to_disk, disk_to_hot,
        host_to_hot; on CUDA the seconds are those of issuing the asynchronous copies)."""
        with self._lock:
            p = self.policy
            return {"host_pages": len(self._host), "disk_pages": len(self._disk),
                    "host_capacity": p.host_pages, "disk_capacity": p.disk_pages,
                    "host_bytes": sum(self.page_bytes(n) for _, n in self._host.values()),
                    "disk_bytes": sum(self.page_bytes(n) for n in self._disk.values()),
                    "host_allocated_bytes": self._pool.allocated_bytes(), **self._stats}

    # ---------------------------------------------------------------- moves
    def demote(self, key: PageKey, k: Tensor, v: Tensor, pos: Tensor,
               score: Tensor | None = None, *, summarize: bool = True) -> None:
        """Move one hot page down: k, v [Hkv, n, D] (cache dtype, any device), pos [Hkv, n]
        (or [n]: the same in every head; -1 marks an empty slot), score [Hkv, n] (default 0).

        The page lands on host (spilling the least recently used host page to disk when
        host is full) or, with no host tier, on disk. Raises ValueError, changing nothing,
        when the store is full under disk_full="error" or already holds `key`.
        `summarize=False` when the caller already added the page's summary.
        """
        self.demote_run([key], k, v, pos, score, summarize=summarize)

    def demote_run(self, keys: list[PageKey], k: Tensor, v: Tensor, pos: Tensor,
                   score: Tensor | None = None, *, summarize: bool = True) -> None:
        """Demote consecutive pages in one call: k, v [Hkv, N, D], pos, score [Hkv, N] (pos
        may be [N]); page i is tokens [i * page_size, (i + 1) * page_size), only the last
        may be shorter, and goes under keys[i]. As `demote` page by page (keys[0] becomes
        the least recent), but checked up front and copied a run of free slots at a time.
        CUDA tensors are copied asynchronously on the current stream: work queued there
        after this call may overwrite them; other streams and the host must wait for it."""
        hp, ps = self.policy.host_pages, self.page_size
        keys = [self._key(x) for x in keys]
        page = self._check_page(k, v, pos, score, len(keys))
        sizes = [min(ps, page.k.shape[1] - i * ps) for i in range(len(keys))]
        with self._lock:
            if self._files is not None:  # earlier device pages bound for disk that landed
                self._files.settle()
            held = [x for x in keys if x in self._host or x in self._disk]
            if held or len(set(keys)) != len(keys):
                raise ValueError(f"pages {held or keys} are already demoted or repeated "
                                 f"(delete them first)")
            self._room(len(keys) if hp == 0 else max(0, len(self._host) + len(keys) - hp))
            added = []
            try:
                for i, key in enumerate(keys if summarize else ()):
                    sl = slice(i * ps, i * ps + sizes[i])
                    self.summaries.add(key, page.k[:, sl], page.pos[:, sl] >= 0)
                    added.append(key)
                step = hp or 1  # more pages than host holds: in host-sized groups
                for j in range(0, len(keys), step):
                    self._place(keys[j:j + step], page, j, sizes[j:j + step])
            except BaseException:  # pages not stored keep no summary
                for key in added:
                    if self.tier_of(key) is None:
                        self.summaries.remove(key)
                raise

    def add_summary(self, key: PageKey, k: Tensor, pos: Tensor) -> None:
        """Summarise a page before demoting it with summarize=False (the transfer engine
        does this on the caller's stream). Only slots with pos >= 0 count."""
        key = self._key(key)
        if pos.dim() == 1:
            pos = pos.expand(k.shape[0], -1)
        self.summaries.add(key, k, pos >= 0)

    def _place(self, keys: list[PageKey], page: Page, first: int, sizes: list[int]) -> None:
        """Store pages first, first + 1, ... of `page` (at most host_pages of them)."""
        hp, ps = self.policy.host_pages, self.page_size
        t0 = time.perf_counter()
        if hp == 0:  # no host tier: straight to disk
            for i, (key, n) in enumerate(zip(keys, sizes)):
                lo = (first + i) * ps
                self._write(key, Page(*(t[:, lo:lo + n] for t in page)), hot=True)
            self._count("host_to_disk", sum(sizes), len(keys), t0)
            return
        while len(self._host) + len(keys) > hp:
            self._spill(next(iter(self._host)))
        t0 = time.perf_counter()
        slots = self._pool.take(len(keys))
        self._pool.copy_runs(slots, sizes, page, first * ps, into_slots=True)
        for key, slot, n in zip(keys, slots, sizes):
            self._host[key] = (slot, n)
        self._count("hot_to_host", sum(sizes), len(keys), t0)

    def spill(self, keys: list[PageKey] | None = None) -> None:
        """Move host pages to disk now (default: all of them, least recent first)."""
        with self._lock:
            keys = list(self._host) if keys is None else [self._key(k) for k in keys]
            for key in keys:
                if key not in self._host:
                    raise ValueError(f"page {key} is not on the host tier "
                                     f"(it is on: {self.tier_of(key)})")
            self._room(len(keys))
            for key in keys:
                self._spill(key)

    def recall(self, keys: list[PageKey], device: str | torch.device | None = None, *,
               keep: bool = True) -> list[Page]:
        """Bit-exact copies of pages (k, v [Hkv, n, D], pos, score [Hkv, n]) on `device`
        (default: the hot device), as views of new buffers (see `recall_into`).
        keep=False moves them instead (promotion back to hot): they leave the store and
        lose their summaries. Recalled pages become the most recently used."""
        device = self.hot_device if device is None else torch.device(device)
        with self._lock:  # the lengths must not change before the copies
            t = sum(self._host[x][1] if x in self._host else self._disk.get(x, 0)
                    for x in keys if isinstance(x, tuple))
            hn, dtype, d = (self.kv_heads, t), self.dtype, self.head_dim
            out = Page(*(torch.empty(hn + tail, dtype=dt, device=device) for dt, tail in
                         ((dtype, (d,)), (dtype, (d,)),
                          (torch.int64, ()), (torch.float32, ()))))
            ns = self.recall_into(keys, out, keep=keep)
        at = accumulate(ns, initial=0)
        return [Page(*(x[:, a:a + n] for x in out)) for a, n in zip(at, ns)]

    def recall_into(self, keys: list[PageKey], out: Page, *, keep: bool = True) -> list[int]:
        """Copy pages back to back along the token axis of preallocated hot buffers
        `out` = (k, v [Hkv, T, D], pos, score [Hkv, T], any device): page i lands at
        [:, o_i:o_i + n_i] with o_i the sum of the earlier n. Returns [n_i]. Disk pages are
        read and verified in one reusable staging buffer, so a steady recall allocates
        nothing. On a PageCorruptError `out` may hold part of the data: discard it."""
        hkv, d, dtype = self.kv_heads, self.head_dim, self.dtype
        keys = [self._key(k) for k in keys]
        if (not isinstance(out, tuple) or len(out) != 4
                or not all(isinstance(t, Tensor) for t in out)):
            raise TypeError("out must be a Page (k, v, pos, score) of tensors")
        k, v, pos, score = out
        t_cap = k.shape[1] if k.dim() == 3 else -1
        want = ((dtype, (hkv, t_cap, d)),) * 2 + (
            (torch.int64, (hkv, t_cap)), (torch.float32, (hkv, t_cap)))
        if any((t.dtype, tuple(t.shape)) != w for t, w in zip(out, want)):
            raise ValueError(f"out must be k, v {dtype} [{hkv}, T, {d}], pos "
                             f"int64 and score float32 [{hkv}, T]; got "
                             f"{[(str(t.dtype), tuple(t.shape)) for t in out]}")
        with self._lock:
            self._held(keys)
            self._readahead(keys)
            ns = [self._host[key][1] if key in self._host else self._disk[key] for key in keys]
            if sum(ns) > t_cap:
                raise ValueError(f"out holds T={t_cap} tokens, the pages need {sum(ns)}")
            at, i = 0, 0
            while i < len(keys):
                t0, j = time.perf_counter(), i + 1
                if keys[i] in self._disk:
                    src, buf = self._files.read(keys[i])
                    for dst, x in zip(out, src):  # pinned -> device: asynchronous
                        dst[:, at:at + ns[i]].copy_(x, non_blocking=True)
                    self._files.release(buf, k.device)
                else:  # a stretch of host pages
                    while j < len(keys) and keys[j] in self._host:
                        j += 1
                    slots = [self._host[x][0] for x in keys[i:j]]
                    self._pool.copy_runs(slots, ns[i:j], out, at, into_slots=False)
                self._touch(keys[i:j], ns[i:j], t0)
                at += sum(ns[i:j])
                i = j
            if not keep:
                self.delete(keys)
            return ns

    def delete(self, keys: list[PageKey]) -> None:
        """Discard pages for good (host slots freed, disk files removed, summaries dropped).
        The only way, besides disk_full="drop_lru", that data leaves the store."""
        keys = [self._key(k) for k in keys]
        with self._lock:
            for key in keys:
                if key in self._host:
                    self._pool.give(self._host.pop(key)[0])
                elif key in self._disk:
                    del self._disk[key]
                    self._files.remove(key)
                else:
                    raise KeyError(f"page {key} is not held by the store")
                if key in self.summaries:
                    self.summaries.remove(key)

    def close(self) -> None:
        """Delete every page and this rank's disk directory (spilled pages are scratch, so
        files already removed underneath the store are not an error)."""
        with self._lock:
            for key in list(self._host) + list(self._disk):
                if key in self._host:
                    self._pool.give(self._host.pop(key)[0])
                else:
                    del self._disk[key]
                    self._files.remove(key, missing_ok=True)
                if key in self.summaries:
                    self.summaries.remove(key)
            self._pool.wait_all()  # no copy may still use the segments released here
            self._pool = HostPool(**self._pool.spec)
            if self._files is not None:
                self._files.close()

    # ---------------------------------------------------------------- internals
    def _key(self, key: object) -> PageKey:
        if (not isinstance(key, tuple) or len(key) != 3
                or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                           for x in key)):
            raise ValueError(f"page key must be (layer, seq, page_id) of non-negative ints, "
                             f"got {key!r}")
        return key

    def _check_page(self, k: Tensor, v: Tensor, pos: Tensor, score: Tensor | None,
                    pages: int) -> Page:
        """Validate `pages` consecutive pages' tensors; pos broadcast, score defaulted."""
        hkv, d, ps, dtype = self.kv_heads, self.head_dim, self.page_size, self.dtype
        lo, hi = (pages - 1) * ps + 1, pages * ps
        for name, t in (("k", k), ("v", v), ("pos", pos), ("score", score)):
            if not isinstance(t, Tensor) and not (name == "score" and t is None):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if k.dtype != dtype or v.dtype != dtype:
            raise ValueError(f"k/v dtype is {k.dtype}/{v.dtype}, the store holds {dtype}")
        if (k.dim() != 3 or k.shape != v.shape or k.shape[0] != hkv
                or k.shape[2] != d or not lo <= k.shape[1] <= hi):
            raise ValueError(f"k and v must both be [{hkv}, n, {d}] with "
                             f"{lo} <= n <= {hi} ({pages} page(s) of {ps}), got "
                             f"{tuple(k.shape)} and {tuple(v.shape)}")
        hn = (hkv, k.shape[1])
        if pos.dtype != torch.int64 or pos.shape not in (hn, hn[1:]):
            raise ValueError(f"pos must be int64 {list(hn)} or [{hn[1]}], got {pos.dtype} "
                             f"{tuple(pos.shape)}")
        if score is None:
            score = torch.zeros(hn, dtype=torch.float32, device=k.device)
        if score.dtype != torch.float32 or score.shape != hn:
            raise ValueError(f"score must be float32 {list(hn)}, got {score.dtype} "
                             f"{tuple(score.shape)}")
        return Page(k, v, pos.expand(hn), score)

    def _room(self, to_disk: int) -> None:
        """Raise unless `to_disk` more pages fit on disk (or may push old ones out)."""
        p = self.policy
        if to_disk == 0 or self.disk_full == "drop_lru" and p.disk_pages > 0:
            return
        if len(self._disk) + to_disk > p.disk_pages:
            raise ValueError(f"tier store full: host holds {len(self._host)}/{p.host_pages} "
                             f"pages and disk {len(self._disk)}/{p.disk_pages}; {to_disk} more "
                             f"page(s) must go to disk. delete() pages, raise disk_pages, or "
                             f"set disk_full='drop_lru' to allow hard eviction")

    def _spill(self, key: PageKey) -> None:
        t0 = time.perf_counter()
        slot, n = self._host[key]
        self._write(key, Page(*(t[:, :n] for t in self._pool.slot(slot))), hot=False)
        del self._host[key]
        self._pool.give(slot)
        self._count("host_to_disk", n, 1, t0)

    def _write(self, key: PageKey, page: Page, *, hot: bool) -> None:
        """`page` to disk; hot: it comes from the hot tier (else from a host slot)."""
        if len(self._disk) >= self.policy.disk_pages:  # only with disk_full="drop_lru"
            self.delete([next(iter(self._disk))])
            self._stats["dropped"] += 1
        self._files.write(key, page, hot=hot)
        self._disk[key] = page.k.shape[1]

    def _readahead(self, keys: list[PageKey]) -> None:
        """Start the drive on a recall's disk pages while earlier ones are copied."""
        if self._files is not None:
            self._files.readahead([key for key in keys if key in self._disk])

    def _held(self, keys: list[PageKey]) -> None:
        missing = [k for k in keys if k not in self._host and k not in self._disk]
        if missing:
            raise KeyError(f"pages not held by the store: {missing}")

    def _touch(self, keys: list[PageKey], ns: list[int], t0: float) -> None:
        """Count a recall of pages of one tier; they become its most recently used."""
        tier = self._host if keys[0] in self._host else self._disk
        for key in keys:
            tier.move_to_end(key)
        self._count("host_to_hot" if tier is self._host else "disk_to_hot", sum(ns),
                    len(keys), t0)

    def _count(self, path: str, n: int, pages: int, t0: float) -> None:
        """Account `pages` pages holding n slots in all moved along `path`."""
        moved = self._stats
        moved[path + "_bytes"] += self.page_bytes(n)
        moved[path + "_pages"] += pages
        moved[path + "_seconds"] += time.perf_counter() - t0
