"""ShardedKVCache: each rank keeps the K/V of the tokens it owns; prefill and decode are exact.

* Prefill (`prefill_chunk`): a chunk of a prompt, sharded over the ranks by the layout,
  attends to the whole cached prefix (wherever it lives: schedule `q`, the chunk's queries
  travel) and causally to itself (ring attention), merged by lse; its K/V are then stored
  where the tokens live. Activation memory is bounded by the chunk, not the prompt.
* Decode (`decode`): the new token's q/k/v are the same on every rank. Each rank attends to
  its shard, the partials merge exactly across ranks, the new token's own term is added
  locally (every rank has it), and only then does the least-loaded rank store it.

Every rank keeps the same table of per-rank token counts, so placement and capacity checks
agree without communication; step counters ride along with the decode merge, so ranks that
disagree fail together instead of corrupting the cache.

Eviction (`eviction=EvictionPolicy(...)`, see `ringmem.eviction`): a coordinator keeps the
globally most important tokens under one budget per (layer, KV head). After a per-head
eviction, heads hold different tokens (`PagedStore` packs each head separately); decode
then attends per head, and prefill's prefix pass runs the ring once per KV head. Positions
keep counting from `next_position`, which `seq_len` (tokens held) no longer equals.

Memory tiers (`tiers=TierPolicy(...)`, see `tiered.py`): evicted entries are demoted to host
and disk instead of dropped, and each decode step recalls, per rank, the demoted pages
whose Quest bound is highest for the query; attention is exact over hot + recalled
(+ pending) entries, merged by lse before the one cross-rank merge. `save` / `load`
checkpoint the whole cache, tiers included (`checkpoint.py`).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..agree import agree
from ..backends import get_backend
from ..comm import Group, RingComm, gather_rows, group_rank_world
from ..layouts import positions
from ..partial import Partial, acc_dtype, attend, merge
from ..ring import RingSpec, ring_forward
from .config import CacheConfig
from .decode import merge_across_ranks
from .paged import PagedStore
from .tiers import Demote, TieredPages, TierPolicy

if TYPE_CHECKING:
    from ..eviction.budget import EvictionPolicy
    from ..eviction.coordinator import EvictionRecord


class ShardedKVCache:
    """Per-layer paged K/V shards of up to `max_seqs` sequences across a process group."""

    def __init__(self, config: CacheConfig, *, group: Group = None,
                 eviction: "EvictionPolicy | None" = None,
                 tiers: TierPolicy | None = None) -> None:
        if not isinstance(config, CacheConfig):
            raise TypeError(f"config must be a CacheConfig, got {type(config).__name__}")
        from ..eviction.actions import HardDrop
        from ..eviction.budget import EvictionPolicy  # lazy: eviction imports nothing here
        from ..eviction.coordinator import Coordinator
        if eviction is not None and not isinstance(eviction, EvictionPolicy):
            raise TypeError(f"eviction must be an EvictionPolicy or None, got "
                            f"{type(eviction).__name__}")
        if tiers is not None and not isinstance(tiers, TierPolicy):
            raise TypeError(f"tiers must be a TierPolicy or None, got {type(tiers).__name__}")
        if tiers is not None and eviction is not None and \
                not isinstance(eviction.action, HardDrop):
            raise ValueError(f"with tiers= the cache demotes evicted entries itself; "
                             f"eviction.action must be the default HardDrop, got "
                             f"{type(eviction.action).__name__}")
        self.config, self.group = config, group
        self.rank, self.world = group_rank_world(group)
        self.device = torch.device(config.device)
        num_pages = -(-config.capacity // config.page_size)
        self.stores = [PagedStore(num_pages=num_pages, page_size=config.page_size,
                                  kv_heads=config.kv_heads, head_dim=config.head_dim,
                                  max_seqs=config.max_seqs, dtype=config.dtype,
                                  device=self.device) for _ in range(config.num_layers)]
        # counts[layer][seq][rank]: tokens of seq held by each rank (same on every rank)
        self.counts = [[[0] * self.world for _ in range(config.max_seqs)]
                       for _ in range(config.num_layers)]
        # head_counts[layer][seq][rank][h]: tokens of KV head h (differ after per-head
        # eviction; counts = their max); split: some rank's heads hold different tokens;
        # seen: tokens ever added (the next position). All replicated on every rank.
        self.head_counts = [[[[0] * config.kv_heads for _ in range(self.world)]
                             for _ in range(config.max_seqs)] for _ in range(config.num_layers)]
        self.split = [[False] * config.max_seqs for _ in range(config.num_layers)]
        self.seen = [[0] * config.max_seqs for _ in range(config.num_layers)]
        self.tiers: TieredPages | None = None
        error = None
        try:  # directories and threads: may fail on one rank only
            if tiers is not None:
                self.tiers = TieredPages(tiers, config, self.rank, self.device)
                if eviction is not None:
                    eviction = dataclasses.replace(eviction, action=Demote(self.tiers))
        except (OSError, ValueError, TypeError) as e:
            error = e
        self.eviction = None if eviction is None else Coordinator(self, eviction)
        c = config
        agree("ShardedKVCache", group, error, device=self.device,
              dims=(c.num_layers, c.q_heads, c.kv_heads, c.head_dim),
              capacity=(c.capacity, c.page_size, c.max_seqs), dtype=c.dtype,
              layout=c.layout, merge=c.merge,
              **{"eviction policy": None if eviction is None else eviction.signature(),
                 "tiers (on, recall)": None if tiers is None else tiers.signature()})

    # ---------------------------------------------------------------- bookkeeping
    def seq_len(self, seq: int = 0, layer: int = 0) -> int:
        """Global number of cached tokens of `seq` in `layer` (per rank, slots in use: the
        most any KV head holds there)."""
        return sum(self.counts[self._layer(layer)][self._seq(seq)])

    def next_position(self, seq: int = 0, layer: int = 0) -> int:
        """Global position of the next token of `seq` (tokens ever added, evicted included)."""
        return self.seen[self._layer(layer)][self._seq(seq)]

    def head_counts_of(self, seq: int = 0, layer: int = 0) -> list[list[int]]:
        """[rank][KV head] tokens held (they differ across heads after per-head eviction)."""
        return [list(r) for r in self.head_counts[self._layer(layer)][self._seq(seq)]]

    def _add(self, layer: int, seq: int, rank: int, n: int) -> None:
        self.counts[layer][seq][rank] += n
        row = self.head_counts[layer][seq][rank]
        row[:] = [x + n for x in row]

    def refresh_counts(self, layer: int, seq: int) -> Tensor:
        """Re-read every rank's per-head counts of (layer, seq) (collective: one gather)."""
        st = self.stores[layer]
        mine = torch.tensor([*st.hlens[seq], int(st.split[seq])], dtype=torch.int64)
        rows = (gather_rows(mine.to(self._wire()), self.group, self.world).cpu()
                if self.world > 1 else mine[None])
        hkv = self.config.kv_heads
        self.head_counts[layer][seq] = [[int(x) for x in r[:hkv]] for r in rows]
        self.counts[layer][seq] = [max(r) for r in self.head_counts[layer][seq]]
        self.split[layer][seq] = bool(rows[:, hkv].any())
        return rows

    def _wire(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def rank_counts(self, seq: int = 0, layer: int = 0) -> list[int]:
        return list(self.counts[self._layer(layer)][self._seq(seq)])

    def _pages_used(self, layer: int, rank: int, counts=None) -> int:
        ps = self.config.page_size
        return sum(-(-c[rank] // ps) for c in (counts or self.counts[layer]))

    def _check_room(self, layer: int, seq: int, adds: list[int]) -> None:
        """Raise (on every rank alike) if adding adds[r] tokens of `seq` overflows a rank."""
        ps, total = self.config.page_size, self.stores[layer].num_pages
        for r, n in enumerate(adds):
            room = -self.counts[layer][seq][r] % ps
            need = -(-max(0, n - room) // ps)
            if self._pages_used(layer, r) + need > total:
                raise ValueError(f"KV cache capacity exceeded: layer {layer}, sequence {seq} "
                                 f"needs {need} more page(s) on rank {r}, which has "
                                 f"{total - self._pages_used(layer, r)} of {total} free "
                                 f"(capacity {self.config.capacity} tokens per rank)")

    @property
    def acc_dtype(self) -> torch.dtype:
        return torch.float64 if self.config.dtype == torch.float64 else torch.float32

    def _layer(self, layer: int) -> int:
        if not isinstance(layer, int) or not 0 <= layer < self.config.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.config.num_layers}), "
                             f"got {layer!r}")
        return layer

    def _seq(self, seq: int) -> int:
        if not isinstance(seq, int) or not 0 <= seq < self.config.max_seqs:
            raise ValueError(f"seq must be an int in [0, {self.config.max_seqs}), got {seq!r}")
        return seq

    def _check(self, name: str, x: Tensor, heads: int, length: int | None = None) -> None:
        c = self.config
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype != c.dtype:
            raise ValueError(f"{name}.dtype is {x.dtype}, the cache holds {c.dtype}")
        if x.device.type != self.device.type:
            raise ValueError(f"{name} is on {x.device}, the cache is on {self.device}")
        if x.dim() != 4 or x.shape[2] != heads or x.shape[3] != c.head_dim:
            raise ValueError(f"{name} must be [B, S, {heads}, {c.head_dim}] for this cache, got "
                             f"{tuple(x.shape)}")
        if length is not None and x.shape[1] != length:
            raise ValueError(f"{name}.shape[1] must be {length}, got {x.shape[1]}")

    def _scale(self, softmax_scale: float | None) -> float:
        if softmax_scale is None:
            return 1 / math.sqrt(self.config.head_dim)
        if (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float))
                or not math.isfinite(softmax_scale) or softmax_scale <= 0):
            raise ValueError(f"softmax_scale must be a positive finite number, got "
                             f"{softmax_scale!r}")
        return float(softmax_scale)

    # ---------------------------------------------------------------- prefill
    def prefill_chunk(self, layer: int, q: Tensor, k: Tensor, v: Tensor, *, seq: int = 0,
                      n_valid: int | None = None, softmax_scale: float | None = None,
                      backend: str = "auto") -> Tensor:
        """Attend this rank's shard of the next prompt chunk, then cache its K/V.

        q [1, C/P, Hq, D], k/v [1, C/P, Hkv, D]: this rank's part of a chunk of C tokens, split
        by `config.layout` (use `shard_chunk`). The chunk follows the `seq_len` tokens already
        cached. `n_valid`: real tokens in the chunk (the rest is padding at its end: not
        cached, and no real token attends to it). Returns out [1, C/P, Hq, D].
        """
        c, error = self.config, None
        n_loc = q.shape[1] if isinstance(q, Tensor) and q.dim() == 4 else -1
        try:  # collected, then raised on every rank together by `agree`
            layer, seq = self._layer(layer), self._seq(seq)
            self._check("q", q, c.q_heads)
            self._check("k", k, c.kv_heads, n_loc)
            self._check("v", v, c.kv_heads, n_loc)
            if q.shape[0] != 1 or k.shape[0] != 1 or v.shape[0] != 1:
                raise ValueError(f"prefill takes one sequence at a time (batch 1), got "
                                 f"q.shape {tuple(q.shape)}")
            chunk = n_loc * self.world
            n_valid = chunk if n_valid is None else n_valid
            if not isinstance(n_valid, int) or not 0 < n_valid <= chunk:
                raise ValueError(f"n_valid must be an int in [1, {chunk}], got {n_valid!r}")
            scale = self._scale(softmax_scale)
            impl = get_backend(backend, q.device, q.dtype, c.head_dim)
            start = self.seen[layer][seq]
            if self.tiers is not None:  # a full tier store fails here, on every rank
                self.tiers.flush(layer, seq)
        except (TypeError, ValueError, OSError) as e:
            error, layer, seq, start, n_valid, scale = e, -1, -1, -1, -1, 0.0
        agree("prefill_chunk", self.group, error, device=self.device, layer=layer, seq=seq,
              start=start, **{"q.shape": tuple(q.shape) if error is None else None},
              n_valid=n_valid, softmax_scale=scale, backend=backend)
        kept = [int((start + positions(c.layout, r, self.world, n_loc) < start + n_valid).sum())
                for r in range(self.world)]
        self._check_room(layer, seq, kept)  # before any work, identically on every rank
        outs, lses = [], []
        if start > 0:  # the cached prefix, spread over the ranks: the chunk's Q travels
            o, l = self._prefix_pass(layer, seq, q, RingSpec(c.layout, False, scale, impl, "q"))
            outs.append(o)
            lses.append(l)
        spec = RingSpec(c.layout, True, scale, impl, "kv")
        o, l = ring_forward(q, k, v, spec, RingComm(self.group, "fwd", None, q.device))
        outs.append(o)
        lses.append(l)
        if len(outs) > 1:  # ring results: out [1, S, H, D], lse [1, H, S]
            out, lse = merge([Partial(o, l.transpose(1, 2)) for o, l in zip(outs, lses)])
            lse = lse.transpose(1, 2)
        else:
            out, lse = outs[0], lses[0]
        # cache the real tokens of my part; every rank counts every rank's
        pos = start + positions(c.layout, self.rank, self.world, n_loc)
        keep = pos < start + n_valid
        idx = keep.nonzero().flatten().to(k.device)
        self.stores[layer].append(seq, k[0, idx], v[0, idx], pos[keep].to(k.device))
        for r in range(self.world):
            self._add(layer, seq, r, kept[r])
        self.seen[layer][seq] += n_valid
        if self.eviction is not None:  # the observation window, then maybe a compression
            self.eviction.observe(layer, seq, q[0, idx], lse[0][:, idx].t(), pos[keep], scale)
            if self.eviction.policy.prefill == "chunk":
                self.eviction.enforce(layer, seq)
        return out.to(q.dtype)

    def _prefix_pass(self, layer: int, seq: int, q: Tensor, spec: RingSpec
                     ) -> tuple[Tensor, Tensor]:
        """The chunk's queries against the cached prefix on every rank (ring, Q travels);
        once per KV head when heads hold different tokens (per-head eviction)."""
        store, c = self.stores[layer], self.config
        comm = RingComm(self.group, "fwd", None, q.device)
        if not self.split[layer][seq]:
            kp, vp, _ = store.view(seq)
            return ring_forward(q, kp, vp, spec, comm, kv_lens=tuple(self.counts[layer][seq]))
        g, outs, lses = c.q_heads // c.kv_heads, [], []
        for h in range(c.kv_heads):
            kp, vp, _ = store.view(seq, h)
            lens = tuple(r[h] for r in self.head_counts[layer][seq])
            o, l = ring_forward(q[:, :, h * g:(h + 1) * g].contiguous(), kp, vp, spec, comm,
                                kv_lens=lens)
            outs.append(o)
            lses.append(l)
        return torch.cat(outs, 2), torch.cat(lses, 1)

    def shard_chunk(self, x: Tensor, dim: int = 1) -> Tensor:
        """This rank's part of a full chunk tensor, split as `prefill_chunk` expects."""
        n = x.shape[dim]
        if n % self.world:
            raise ValueError(f"chunk length {n} must be a multiple of the world size "
                             f"{self.world} (pad it and pass n_valid)")
        idx = positions(self.config.layout, self.rank, self.world, n // self.world)
        return x.index_select(dim, idx.to(x.device))

    # ---------------------------------------------------------------- decode
    def decode(self, layer: int, q: Tensor, k: Tensor, v: Tensor, *,
               softmax_scale: float | None = None) -> Tensor:
        """One decode step for every sequence: q [B, 1, Hq, D], k/v [B, 1, Hkv, D], the same
        on every rank (B = max_seqs). Returns out [B, 1, Hq, D]: exact attention of each new
        query over its sequence's cached tokens plus the new token, which is then cached on
        the least-loaded rank.

        Errors (bad input, full cache, ranks disagreeing on the step, a full or damaged
        tier store) are raised on every rank after the one collective of the step, so no
        rank is left waiting in it. With tiers, each rank also attends its pending and
        recalled demoted entries (see `tiered.py`) before that merge.
        """
        c, b, acc = self.config, self.config.max_seqs, self.acc_dtype
        try:
            layer = self._layer(layer)
            self._check("q", q, c.q_heads, 1)
            self._check("k", k, c.kv_heads, 1)
            self._check("v", v, c.kv_heads, 1)
            if q.shape[0] != b or k.shape[0] != b or v.shape[0] != b:
                raise ValueError(f"decode takes all {b} sequences (batch {b}), got q.shape "
                                 f"{tuple(q.shape)}, k.shape {tuple(k.shape)}")
            scale = self._scale(softmax_scale)
            # demoted pages: flush, rank by bound, fetch (errors ride the merge below)
            recalled = None if self.tiers is None else self.tiers.prepare(layer, q, scale)
            error = None
        except (TypeError, ValueError, KeyError, OSError) as e:
            error = e
        dev = q.device if error is None else self.device
        outs = torch.zeros(b, c.q_heads, c.head_dim, dtype=acc, device=dev)
        lses = torch.full((b, c.q_heads), float("-inf"), dtype=acc, device=dev)
        owners, full = [], None
        if error is None:
            store, counts = self.stores[layer], self.counts[layer]
            after = [list(x) for x in counts]
            for s in range(b):  # placement and capacity, decided identically on every rank
                owner = min(range(self.world), key=lambda r: (after[s][r], r))
                after[s][owner] += 1
                owners.append(owner)
                if full is None and self._pages_used(layer, owner, after) > store.num_pages:
                    full = (f"KV cache capacity exceeded: layer {layer}, sequence {s} needs a "
                            f"new page on rank {owner}, which has all {store.num_pages} pages "
                            f"in use (capacity {c.capacity} tokens per rank)")
            want_logits = (self.eviction is not None
                           and self.eviction.policy.scorer.decay is not None)
            logits: list[list[Tensor] | None] = [[] if want_logits else None for _ in range(b)]
            for s in range(b):
                outs[s], lses[s] = self._partial(layer, s, q[s, 0], scale, logits[s])
                if recalled is not None and recalled[s] is not None:
                    outs[s], lses[s] = self.tiers.attend(recalled[s], q[s, 0], scale,
                                                         outs[s], lses[s])
            lengths = [*self.seen[layer], *(sum(x) for x in counts)]
        else:
            lengths = [-1] * 2 * b
        meta = torch.tensor([layer if error is None else -1, *lengths, full is not None,
                             error is not None], dtype=torch.float64, device=dev)
        out, lse, seen = merge_across_ranks(outs, lses, meta, self.group, self.world, c.merge)
        rows = seen.tolist()
        if any(r[-1] for r in rows):
            if error is not None:
                raise error
            bad = [i for i, r in enumerate(rows) if r[-1]]
            raise ValueError(f"decode: rank(s) {bad} rejected their inputs (see the error "
                             f"raised there); every rank stops")
        if not torch.equal(seen.min(0).values, seen.max(0).values):
            raise ValueError(f"ranks disagree on the decode step (layer, each sequence's "
                             f"next position, then cached length, per rank): "
                             f"{[r[:-2] for r in rows]}")
        if full is not None:
            raise ValueError(full)
        # the new token's own term, identical on every rank, then the exact merge
        qs = q[:, 0].to(acc) * scale
        groups = c.q_heads // c.kv_heads
        kn = k[:, 0].to(acc).repeat_interleave(groups, 1)
        vn = v[:, 0].to(acc).repeat_interleave(groups, 1)
        l_new = (qs * kn).sum(-1)  # [B, Hq]
        out, lse_all = merge([Partial(out, lse), Partial(vn, l_new)])
        for s, owner in enumerate(owners):
            pos = self.seen[layer][s]
            init = None
            if self.eviction is not None:  # fold this query's exact mass into the scores
                self.eviction.before_decode(layer, s)  # the prompt's window first (older)
                init = self.eviction.after_decode(layer, s, logits[s], lse_all[s],
                                                  l_new[s], q[s, 0], pos, owner, scale)
            if owner == self.rank:
                store.append(s, k[s], v[s], torch.tensor([pos], device=k.device), init)
            self._add(layer, s, owner, 1)
            self.seen[layer][s] += 1
        if self.eviction is not None:
            self.eviction.decode_step_done(layer)
        return out.unsqueeze(1).to(q.dtype)

    def _partial(self, layer: int, seq: int, q: Tensor, scale: float,
                 logits: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
        store = self.stores[layer]
        # per-key scores (eviction) and per-head token sets come from the paged pass
        if self.config.decode_backend == "paged" or logits is not None or \
                not store.uniform(seq):
            hr = None if store.uniform(seq) else store.head_runs(seq)
            return attend(q, store.k, store.v, scale, runs=store.runs(seq), head_runs=hr,
                          logits=logits)
        kk, vv, _ = store.view(seq)
        acc = self.acc_dtype
        if kk.shape[1] == 0:
            return (torch.zeros(q.shape, dtype=acc, device=q.device),
                    torch.full(q.shape[:1], float("-inf"), dtype=acc, device=q.device))
        impl = get_backend(self.config.decode_backend, q.device, q.dtype, q.shape[-1])
        decode = getattr(impl, "decode", None)  # a split-KV kernel when the backend has one
        o, l = (decode(q[None, None], kk, vv, scale) if decode is not None
                else impl.fwd(q[None, None], kk, vv, scale, False))
        return o[0, 0].to(acc), l[0, :, 0].to(acc)

    # ---------------------------------------------------------------- low level
    def extend_local(self, layer: int, seq: int, k: Tensor, v: Tensor, pos: Tensor) -> None:
        """Append tokens to *this rank's* shard only (k, v [n, Hkv, D], pos [n]); every rank
        must then call `sync()` so all ranks see the new counts."""
        layer, seq = self._layer(layer), self._seq(seq)
        self.stores[layer].append(seq, k, v, pos)

    def sync(self) -> None:
        """Refresh every rank's tables of per-rank (per-head) token counts and each
        sequence's next position (past every position held anywhere) (collective)."""
        c = self.config
        mine = []
        for st in self.stores:
            for s in range(c.max_seqs):
                top = max((int(st.pos[h, st.head_slots(s, h)].max()) + 1
                           for h in range(c.kv_heads) if st.hlens[s][h]), default=0)
                mine += [*st.hlens[s], int(st.split[s]), top]
        mine_t = torch.tensor(mine, dtype=torch.int64)
        rows = (gather_rows(mine_t.to(self._wire()), self.group, self.world).cpu()
                if self.world > 1 else mine_t.unsqueeze(0))
        table = rows.reshape(self.world, c.num_layers, c.max_seqs, c.kv_heads + 2)
        for lay in range(c.num_layers):
            for s in range(c.max_seqs):
                t = table[:, lay, s]
                self.head_counts[lay][s] = [[int(x) for x in r[:c.kv_heads]] for r in t]
                self.counts[lay][s] = [max(r) for r in self.head_counts[lay][s]]
                self.split[lay][s] = bool(t[:, c.kv_heads].any())
                self.seen[lay][s] = max(self.seen[lay][s], int(t[:, -1].max()))

    def reset(self, seq: int) -> None:
        seq = self._seq(seq)
        for layer, store in enumerate(self.stores):
            store.reset(seq)
            self.counts[layer][seq] = [0] * self.world
            self.head_counts[layer][seq] = [[0] * self.config.kv_heads
                                            for _ in range(self.world)]
            self.split[layer][seq] = False
            self.seen[layer][seq] = 0
        if self.eviction is not None:
            self.eviction.reset(seq)
        if self.tiers is not None:  # the only way demoted pages are deleted
            self.tiers.reset(seq)

    def compress(self, layer: int | None = None, seq: int | None = None
                 ) -> "list[EvictionRecord]":
        """Enforce the eviction budget now on `layer` (default: every layer) and `seq`
        (default: every sequence), e.g. after a chunked prefill. Collective: every rank
        calls it with the same arguments (a mismatch raises on every rank). Returns what
        each compression did (layers and sequences within budget are skipped). Under
        allocation "global" the layers share one pool: `layer` must be None."""
        if self.eviction is None:  # replicated: the constructor checked every rank's policy
            raise ValueError("this cache has no eviction policy (pass eviction=... to "
                             "ShardedKVCache)")
        return self.eviction.compress_cache(layer, seq)

    def tier_stats(self) -> dict:
        """This rank's tier usage (`TieredPages.stats`): pages and bytes per tier, pending
        entries, summary bytes, recall counters. Empty without tiers."""
        return {} if self.tiers is None else self.tiers.stats()

    def close(self) -> None:
        """Stop the tiers' transfer worker and delete their pages and files."""
        if self.tiers is not None:
            self.tiers.close()

    def save(self, root: str | Path, *, model_id: str, fsync: bool = True) -> Path:
        """Checkpoint every rank's shard under `root` (collective; see `checkpoint.py`):
        hot pages, demoted pages, bookkeeping, eviction state. Returns this rank's
        manifest path."""
        from .checkpoint import save_cache
        return save_cache(self, root, model_id=model_id, fsync=fsync)

    @classmethod
    def load(cls, root: str | Path, config: CacheConfig, *, model_id: str,
             group: Group = None, eviction: "EvictionPolicy | None" = None,
             tiers: TierPolicy | None = None) -> "ShardedKVCache":
        """A cache resumed from `save` (collective). model id, layout, world size, dtype,
        dims, page size, capacity, eviction policy and the files are all checked; any
        mismatch or damage raises on every rank."""
        from .checkpoint import load_cache
        cache = cls(config, group=group, eviction=eviction, tiers=tiers)
        try:
            load_cache(cache, root, model_id=model_id)
        except BaseException:
            cache.close()  # its tier worker and scratch directory
            raise
        return cache

    def memory_bytes(self) -> int:
        """Bytes this rank's cache pools take (K, V and metadata)."""
        return sum(t.numel() * t.element_size() for s in self.stores
                   for t in (s.k, s.v, s.pos, s.score))

