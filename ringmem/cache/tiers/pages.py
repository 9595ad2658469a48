"""The cache-facing side of the tiers: evicted entries are demoted, then recalled by query.

* `TieredPages`: what a `ShardedKVCache` built with `tiers=TierPolicy(...)` holds per rank
  (`cache.tiers`); it owns the rank's `TierStore` and, with prefetch, a `TransferEngine`.
* `Demote`, the eviction action the cache installs: the evicted (KV head, token) entries
  of each (layer, seq) are buffered per head ("pending": hot, always attended). Once a
  head holds a page's worth they are packed into demoted pages: slot j of head h holds that
  head's j-th entry, so one page may hold different tokens per head, and a head that
  evicted fewer has empty slots (pos = -1). Pages go to this rank's `TierStore` (host, LRU
  spill to disk) with their Quest summaries on the hot device.
* Decode (`prepare`; the decode pipeline attends what it returns): each rank bounds its
  own demoted pages of (layer, seq) with the query, recalls its top `recall` pages (ties:
  lower page id), attends exactly over pending + recalled (per-head masks) and merges that
  with the hot partial by lse, before the step's one cross-rank merge. The budget is per
  rank: a global top-n would cost a collective per layer.
* Prefetch: while layer l computes, the transfer worker recalls layer l+1's selection of
  the previous step. Pages the new selection needs but the prefetch lacks are recalled at
  once, and pages are attended in selection order, so outputs never depend on timing.
* On CUDA a step does not wait for the device but once per layer: pages are ranked on the
  device, and which ones the query picked is data the host must read before it can
  recall them (one non_blocking read of every sequence's picks, waited for as late as
  possible). Demotions copy to host on a side stream, recalls on the compute stream, both
  non_blocking from pinned memory (the lifetime rules are in `staging`).

Prefill attends hot tokens only (later prompt chunks do not see demoted tokens), as with
hard eviction. Demoted pages are dropped only by `reset(seq)` (or `close`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import torch
from torch import Tensor

from ...partial import Partial
from .host import Page
from .policy import TierPolicy
from .staging import Readback
from .store import TierStore
from .summaries import NAN_BOUNDS, PageKey, Picks
from .transfer import Transfer, TransferEngine

if TYPE_CHECKING:
    from ..config import CacheConfig

_GROUP = 64  # pages packed per demote_run call (bounds the staging copy)


class Entries(NamedTuple):
    """Pending evicted entries of one head: pos [n], k, v [n, D], score [n]."""
    pos: Tensor
    k: Tensor
    v: Tensor
    score: Tensor


class Gathered(NamedTuple):
    """Entries a decode step attends besides the hot pages: k, v [Hkv, n, D], pos [Hkv, n]
    (-1: an empty slot)."""
    k: Tensor
    v: Tensor
    pos: Tensor


class Demote:
    """Eviction action: evicted entries go to the cache's tiers instead of being dropped."""

    def __init__(self, tiers: TieredPages) -> None:
        self.tiers = tiers

    def demote(self, layer: int, seq: int, head: int, pos: Tensor, k: Tensor, v: Tensor,
               score: Tensor) -> None:
        self.tiers.add(layer, seq, head, pos, k, v, score)


class TieredPages:
    """One rank's demoted K/V of every layer and sequence: pending entries, the tier
    store, summaries, the recall selection and the prefetches in flight."""

    def __init__(self, policy: TierPolicy, config: CacheConfig, rank: int,
                 device: torch.device) -> None:
        c = config
        self.policy, self.ps, self.hkv, self.d = policy, c.page_size, c.kv_heads, c.head_dim
        self.dtype, self.device, self.num_layers = c.dtype, device, c.num_layers
        self.store = TierStore(policy, kv_heads=c.kv_heads, head_dim=c.head_dim,
                               page_size=c.page_size, dtype=c.dtype, rank=rank,
                               hot_device=device)
        self.engine = TransferEngine(self.store, device) if policy.prefetch else None
        # demotions' copies to host run here, so compute never queues behind them
        self._side = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._readback = Readback(pin=self.store.pin)
        self.pending: dict[tuple[int, int], list[Entries]] = {}
        self._padded: dict[tuple[int, int], Page] = {}  # pending as one masked page
        self.next_id: dict[tuple[int, int], int] = {}
        self.selected: dict[tuple[int, int], list[PageKey]] = {}
        """(layer, seq) -> the pages recalled by the latest decode step, best first."""
        self._inflight: dict[int, Transfer] = {}
        self.counters = {"recalled_pages": 0, "prefetched_used": 0, "recalled_sync": 0,
                         "host_attended_bytes": 0}
        self.in_place: dict[tuple[int, int], bool] = {}
        """(layer, seq) -> whether the latest step attends its host pages in place."""

    # ------------------------------------------------------------ demotion
    def add(self, layer: int, seq: int, head: int, pos: Tensor, k: Tensor, v: Tensor,
            score: Tensor) -> None:
        """Buffer evicted entries of one head (pos [n], k, v [n, D], score [n])."""
        ents = self.pending.setdefault((layer, seq), [self._empty() for _ in range(self.hkv)])
        e = ents[head]
        ents[head] = Entries(torch.cat([e.pos, pos.to(e.pos)]), torch.cat([e.k, k.to(e.k)]),
                             torch.cat([e.v, v.to(e.v)]),
                             torch.cat([e.score, score.to(e.score)]))
        self._padded.pop((layer, seq), None)

    def _empty(self, n: int = 0) -> Entries:
        dev = self.device
        return Entries(torch.zeros(n, dtype=torch.int64, device=dev),
                       torch.zeros(n, self.d, dtype=self.dtype, device=dev),
                       torch.zeros(n, self.d, dtype=self.dtype, device=dev),
                       torch.zeros(n, dtype=torch.float32, device=dev))

    def flush(self, layer: int, seq: int) -> None:
        """Demote every whole page's worth of pending entries of (layer, seq). Each group
        of pages is stored all or nothing (TierStore.demote_run), and entries leave the
        pending buffer only once stored: a full store raises with no data lost."""
        key = (layer, seq)
        ents, ps = self.pending.get(key), self.ps
        while ents is not None:
            full = [e.pos.numel() // ps for e in ents]
            m = min(max(full), _GROUP)
            if m == 0:
                break
            take = [min(f, m) * ps for f in full]
            page = self._pack(ents, take, m * ps)
            first = self.next_id.get(key, 0)
            self._demote([(layer, seq, first + i) for i in range(m)], page)
            self.next_id[key] = first + m
            # clones: a view would keep the whole evicted batch alive
            ents = [Entries(*(t[n:].clone() for t in e)) for e, n in zip(ents, take)]
            self.pending[key] = ents
            self._padded.pop(key, None)

    def _demote(self, keys: list[PageKey], page: Page) -> None:
        """Store whole packed pages, all or nothing. On CUDA the summaries are taken on the
        compute stream (the next ranking sees them at once, and the tables stay on one
        stream) and the copies to host run on the side stream; `page` is not touched
        again by anyone (rule 2 of `staging`)."""
        if self._side is None:
            self.store.demote_run(keys, *page)
            return
        added = []
        try:
            for i, key in enumerate(keys):
                sl = slice(i * self.ps, (i + 1) * self.ps)
                self.store.add_summary(key, page.k[:, sl], page.pos[:, sl])
                added.append(key)
            self._side.wait_stream(torch.cuda.current_stream(self.device))  # page packed
            with torch.cuda.stream(self._side):
                self.store.demote_run(keys, *page, summarize=False)
        except BaseException:  # pages not stored keep no summary
            for key in added:
                if self.store.tier_of(key) is None and key in self.store.summaries:
                    self.store.summaries.remove(key)
            raise

    def _pack(self, ents: list[Entries], take: list[int], width: int) -> Page:
        """Head h's first take[h] entries in slots [0, take[h]) of [Hkv, width] tensors;
        the other slots empty (pos -1, zeros)."""
        dev = self.device
        k = torch.zeros(self.hkv, width, self.d, dtype=self.dtype, device=dev)
        v = torch.zeros_like(k)
        pos = torch.full((self.hkv, width), -1, dtype=torch.int64, device=dev)
        score = torch.zeros(self.hkv, width, dtype=torch.float32, device=dev)
        for h, (e, n) in enumerate(zip(ents, take)):
            k[h, :n], v[h, :n], pos[h, :n], score[h, :n] = e.k[:n], e.v[:n], e.pos[:n], \
                e.score[:n]
        return Page(k, v, pos, score)

    def padded(self, layer: int, seq: int) -> Page | None:
        """The pending entries of (layer, seq) as one page [Hkv, max n_h] (None if none)."""
        key = (layer, seq)
        if key not in self._padded:
            ents = self.pending.get(key)
            n = [e.pos.numel() for e in ents] if ents else [0]
            if max(n) == 0:
                return None
            self._padded[key] = self._pack(ents, n, max(n))
        return self._padded[key]

    # ------------------------------------------------------------ decode
    def prepare(self, layer: int, q: Tensor, scale: float) -> list[Gathered | None]:
        """Flush, select and fetch for one decode step of `layer`: q [B, 1, Hq, D].
        Returns per sequence the pending + recalled entries (k, v, pos), or None."""
        b, n = q.shape[0], self.policy.recall
        for s in range(b):
            self.flush(layer, s)
            self.in_place[(layer, s)] = self._in_place(layer, s)
        handle = self._inflight.pop(layer, None)
        picks = [self.store.summaries.select(layer, s, q[s, 0], n, scale=scale)
                 if n and not self.in_place[(layer, s)] else None for s in range(b)]
        read = self._read_picks(picks)
        for s in range(b):  # pending entries packed while the picks travel
            self.padded(layer, s)
        fetched: dict[PageKey, Page] = {}
        if handle is not None:
            fetched = dict(zip(handle.keys, self.engine.wait(handle)))
        # the step's one wait for the device: which pages the query picked is data the
        # host needs before it can recall them; waited for after the host's other work
        sel = self._selection(layer, picks, read())
        misses = [k for ks in sel for k in ks if k not in fetched]
        if misses:
            fetched.update(zip(misses, self.store.recall(misses)))
        used = sum(len(ks) for ks in sel)
        self.counters["recalled_pages"] += used
        self.counters["recalled_sync"] += len(misses)
        self.counters["prefetched_used"] += used - len(misses)
        if self.engine is not None:  # next layer's previous selection, behind this compute
            nxt = (layer + 1) % self.num_layers
            keys = [k for s in range(b) for k in self.selected.get((nxt, s), ())]
            if keys and nxt not in self._inflight:
                self._inflight[nxt] = self.engine.prefetch(keys)
        out: list[Gathered | None] = []
        for s in range(b):
            self.selected[(layer, s)] = sel[s]
            parts = [p for p in (self.padded(layer, s),) if p is not None]
            parts += [fetched[k] for k in sel[s]]  # selection order: timing-independent
            out.append(None if not parts else Gathered(*parts[0][:3]) if len(parts) == 1
                       else Gathered(*(torch.cat(x, 1) for x in zip(*(p[:3] for p in parts)))))
        return out

    def _in_place(self, layer: int, seq: int) -> bool:
        """Whether this step attends (layer, seq)'s host pages in place (`hostattend`)."""
        mode = self.policy.attend
        if mode == "auto":
            from .hostattend import use_host
            return use_host(self.store, layer, seq, self.policy.recall,
                            self.store.page_bytes(self.ps))
        return mode == "host"

    def host_parts(self, layer: int, q: Tensor, scale: float,
                   softcap: float = 0.0) -> list[Partial | None]:
        """Per sequence of q [B, Hq, D]: the exact partial over its host pages when this
        step attends them in place (`prepare` decided), else None."""
        from .hostattend import host_partial
        out: list[Partial | None] = []
        for s in range(q.shape[0]):
            part = None
            if self.in_place.get((layer, s)):
                part, nbytes = host_partial(self.store, layer, s, q[s], scale, softcap)
                self.counters["host_attended_bytes"] += nbytes
            out.append(part)
        return out

    def _read_picks(self, picks: list[Picks | None]) -> Callable[[], list[int]]:
        """Start the step's one device->host read: every sequence's picked rows, then
        their NaN flags (the picks are data-dependent: the host needs them to recall)."""
        got = [p for p in picks if p is not None]
        if not got:
            return lambda: []
        return self._readback.start(torch.cat([p.rows for p in got]
                                              + [p.nan.view(1).long() for p in got]))

    def _selection(self, layer: int, picks: list[Picks | None], vals: list[int]
                   ) -> list[list[PageKey]]:
        """Per sequence the picked pages' keys, best first, from the values read."""
        got = [p for p in picks if p is not None]
        flags = vals[len(vals) - len(got):]
        if any(flags):
            raise ValueError(NAN_BOUNDS)
        sel, at = [], 0
        for s, p in enumerate(picks):
            m = 0 if p is None else p.rows.shape[0]
            sel.append([(layer, s, p.ids[r]) for r in vals[at:at + m]])
            at += m
        return sel

    # ------------------------------------------------------------ lifecycle
    def drain(self) -> None:
        """Finish the prefetches in flight and forget them (pages may be deleted next)."""
        for handle in self._inflight.values():
            try:
                self.engine.wait(handle)
            except (KeyError, ValueError, OSError):
                pass  # a prefetch of pages deleted since: nobody will read it
        self._inflight.clear()

    def reset(self, seq: int) -> None:
        """Delete every demoted page and pending entry of `seq` (all layers)."""
        self.drain()
        self.store.delete([k for k in self.store.keys() if k[1] == seq])
        for d in (self.pending, self._padded, self.next_id, self.selected):
            for key in [k for k in d if k[1] == seq]:
                del d[key]

    def fork(self, src: int, dst: int) -> None:
        """`dst` gets copies of `src`'s demoted pages and pending entries (demoted pages
        belong to one sequence; a fork's hot pages are shared instead)."""
        self.drain()
        keys = sorted(k for k in self.store.keys() if k[1] == src)
        for key, page in zip(keys, self.store.recall(keys) if keys else []):
            self.store.demote((key[0], dst, key[2]), *(t.to(self.device) for t in page))
        for (layer, s), ents in list(self.pending.items()):
            if s == src:
                self.pending[(layer, dst)] = [Entries(*(t.clone() for t in e)) for e in ents]
        for (layer, s), n in list(self.next_id.items()):
            if s == src:
                self.next_id[(layer, dst)] = n

    def close(self) -> None:
        """Stop the worker and delete every demoted page (spilled files included)."""
        self.drain()
        if self.engine is not None:
            self.engine.close()
        self.store.close()

    def stats(self) -> dict[str, Any]:
        """Tier store stats plus pending entries and bytes, summary bytes, recall counters."""
        pend = [t for ents in self.pending.values() for e in ents for t in e]
        return {**self.store.stats(), **self.counters,
                "pending_entries": sum(e.pos.numel() for ents in self.pending.values()
                                       for e in ents),
                "pending_bytes": sum(t.numel() * t.element_size() for t in pend),
                "summary_bytes": self.store.summaries.nbytes()}

    # ------------------------------------------------------------ checkpoints
    def export(self, layer: int, seqs: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Tensors and JSON state of `layer`'s demoted pages and pending entries."""
        self.drain()
        keys = sorted(k for k in self.store.keys() if k[0] == layer)
        tensors: dict[str, Tensor] = {}
        sizes: list[int] = []
        if keys:
            pages = self.store.recall(keys)
            sizes = [p.k.shape[1] for p in pages]
            for name, *parts in zip(Page._fields, *pages):
                tensors[f"tier_{name}"] = torch.cat(parts, 1)
        for s in range(seqs):
            pend = self.padded(layer, s)
            for name, t in zip(Page._fields, pend or ()):
                tensors[f"pend{s}_{name}"] = t
        state = {"pages": [[k[1], k[2], n] for k, n in zip(keys, sizes)],
                 "next_id": [self.next_id.get((layer, s), 0) for s in range(seqs)]}
        return tensors, state

    def restore(self, layer: int, seqs: int, tensors: dict[str, Tensor],
                state: dict[str, Any]) -> None:
        """Inverse of `export` into this (empty) rank's tiers."""
        at = 0
        for seq, pid, n in state["pages"]:
            page = [tensors[f"tier_{name}"][:, at:at + n] for name in Page._fields]
            self.store.demote((layer, seq, pid), *(t.to(self.device) for t in page))
            at += n
        for s in range(seqs):
            if f"pend{s}_pos" in tensors:
                # entries are packed at the front; counted where the checkpoint was read
                # (the host), not after the move to the device
                n = (tensors[f"pend{s}_pos"] >= 0).sum(1).tolist()
                pos = tensors[f"pend{s}_pos"].to(self.device)
                k, v, sc = (tensors[f"pend{s}_{x}"].to(self.device) for x in ("k", "v", "score"))
                self.pending[(layer, s)] = [Entries(pos[h, :m].clone(), k[h, :m].clone(),
                                                    v[h, :m].clone(), sc[h, :m].clone())
                                            for h, m in enumerate(n)]
            if state["next_id"][s]:
                self.next_id[(layer, s)] = state["next_id"][s]
