"""Decode steps a CUDA graph can hold: a host plan, then a fixed device step.

`ShardedKVCache.decode` decides on the host, inside the step, which page runs each rank
reads and who stores the token, and its kernels' shapes follow the lengths; a CUDA graph
replays one fixed list of kernels over fixed addresses. `GraphedDecode` splits a token step
in two:

- `plan()`, on the host before the step (outside any graph): every layer's placement (the
  least-loaded rule of `decode`), the owner's slot taken in its pages, one agreement of
  every rank on the CPU control group (each layer's positions and lengths, pages short, any
  error) and the input checks of earlier steps. What the device needs goes to one small
  static tensor by one non-blocking copy: per layer and sequence, the slot to write and
  whether this rank owns it.
- `attend(layer, q, k, v)`, device only (capturable: no host read, no shape that follows a
  length): every rank attends over its layer's whole pool in fixed chunks, masked by a
  static membership mask [B, slots] (so the cost follows the pool's size, not the length),
  merges across ranks with the cache's merge (plain collectives), adds the new token's own
  term and sinks, then writes the new k/v into the planned slot and marks it. A rank that
  does not own a token rewrites the values already at a slot nobody writes this step, so
  every rank runs the same kernels at every step.

What `decode` reads at once rides sticky device flags instead (the ranks' q/k/v digests
differ; a non-finite k/v, which is then not stored): a later `plan()` reads them (the next
one on a CPU; on a GPU the one after, from a copy that never waits for the step in flight)
and raises on every rank; `check()` reads them now. `plan()` and the step (or the graph's
replay) must run on the same stream, one step per plan. The masks
follow the stores: a plan compares each page table with what its mask row was built from
and rebuilds a row that differs (after an eager prefill, decode, fork or reset), so graphed
and eager calls mix.

Not graphed (refused by name): eviction and tiers (they score and move entries per step)
and sliding windows (they drop a token per step).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..agree import CAPACITY, agree
from ..call import check_extras
from ..partial import Partial, acc_dtype, merge_into, probs, with_sink
from .checks import check_index, check_scale, check_tensor
from .decode import differ_error, digest, merge_across_ranks, own_token, room

if TYPE_CHECKING:
    from .sharded import ShardedKVCache

Row = tuple[tuple[int, ...], int, int]  # (page table, offset, length) a mask row is built from


class GraphedDecode:
    """Fixed-shape decode steps over `cache` (see the module doc): `plan()` once per token
    step, then `attend(layer, q, k, v)` for every layer, eagerly or replayed from a captured
    CUDA graph. q [B, 1, Hq, D], k/v [B, 1, Hkv, D] as for `decode`; returns [B, 1, Hq, D],
    equal to `decode` to rounding. `chunk`: pool slots scored per kernel (bounds the score
    tensor [Hq, B, chunk] in fp32)."""

    def __init__(self, cache: ShardedKVCache, *, softmax_scale: float | None = None,
                 softcap: float | None = None, sinks: Tensor | None = None,
                 chunk: int = 16384) -> None:
        c, error = cache.config, None
        self.cache, self.chunk = cache, chunk
        self.scale, self.softcap, self.sinks = 0.0, 0.0, sinks
        try:
            why = ("eviction" if cache.eviction is not None else
                   "memory tiers" if cache.tiers is not None else
                   f"sliding windows {c.windows}" if any(w >= 0 for w in c.windows) else None)
            if why is not None:
                raise ValueError(f"GraphedDecode: this cache has {why}, which move or drop "
                                 f"entries at every step on the host; use "
                                 f"ShardedKVCache.decode")
            if not c.check_finite:  # freed pages could then hold NaN, which the step's
                # whole-pool product with 0 probabilities would still spread
                raise ValueError("GraphedDecode needs config.check_finite=True (it checks "
                                 "on the device, with no host sync)")
            if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
                raise ValueError(f"chunk must be a positive int, got {chunk!r}")
            self.scale = check_scale(softmax_scale, c.head_dim)
            like = torch.empty(1, 1, c.q_heads, c.head_dim, device=cache.device)
            self.softcap = check_extras(like, sinks, softcap)
            if min(st.k.shape[1] for st in cache.stores) <= c.max_seqs:
                raise ValueError(f"capacity {c.capacity} must exceed max_seqs {c.max_seqs} "
                                 f"(a graphed step needs one slot nobody writes)")
        except (TypeError, ValueError) as e:
            error = e
        agree("GraphedDecode", cache.group, error, softmax_scale=self.scale,
              softcap=self.softcap, chunk=chunk if isinstance(chunk, int) else -1,
              sinks=None if sinks is None or error else tuple(sinks.shape))
        layers, b, dev = c.num_layers, c.max_seqs, cache.device
        self.member = [torch.zeros(b, st.k.shape[1], dtype=torch.bool, device=dev)
                       for st in cache.stores]
        self.built: list[list[Row | None]] = [[None] * b for _ in range(layers)]
        # [0]: the slot each (layer, sequence) writes; [1]: 1 where this rank owns it
        self.planned = torch.zeros(2, layers, b, dtype=torch.int64, device=dev)
        self._staged = torch.zeros(2, layers, b, dtype=torch.int64,
                                   pin_memory=dev.type == "cuda")
        self._staged_done: torch.cuda.Event | None = None
        # sticky per layer: [ranks' q/k/v differ, k/v not finite]
        self.flags = torch.zeros(layers, 2, dtype=torch.bool, device=dev)
        self._flag_copy: tuple[Tensor, torch.cuda.Event] | None = None
        self._rows = torch.arange(b, device=dev)
        self._blank = torch.zeros(1, c.kv_heads, c.head_dim, dtype=c.dtype, device=dev)
        self._due: set[int] = set()  # layers planned and not yet attended (eager use)
        self.captured = False  # once captured, replays run no Python: no bookkeeping
        self.steps = 0

    # ------------------------------------------------------------------ host
    def plan(self) -> None:
        """Plan the next token step of every layer (collective, host only; see the module
        doc). Raises on every rank: an earlier step's flags, a full cache, disagreement."""
        cache, idx, layers = self.cache, self.cache.index, self.cache.config.num_layers
        b = cache.config.max_seqs
        error = self._flag_error(self._read_flags())
        owners: list[list[int]] = []
        short, full, lengths = 0, None, [-1] * (2 * layers * b)
        if error is None and self._due and not self.captured:
            error = ValueError(f"GraphedDecode.plan: layers {sorted(self._due)} were planned "
                               f"and not attended; call attend for every layer each step")
        if error is None:
            try:
                lengths = []
                for layer in range(layers):
                    owners.append(idx.place_decode(layer))
                    s, f = room(cache, layer, owners[-1], None)
                    short, full = short + s, full or f
                    lengths += [*idx.seen[layer], *(idx.held(layer, q) for q in range(b))]
            except (TypeError, ValueError) as e:
                error, lengths = e, [-1] * (2 * layers * b)  # the same size on every rank
        from .prefill import ROOM
        agree("decode (graphed)", cache.group, error,
              max_words=max(CAPACITY, 10 + 4 * len(lengths)),
              **{"softmax_scale": self.scale, "next positions, then cached lengths":
                 tuple(lengths), "pages short": short}, explain={"pages short": ROOM})
        if full is not None:
            raise ValueError(full)
        if self._staged_done is not None:  # the last plan's copy has left the pinned rows
            self._staged_done.synchronize()
        for layer in range(layers):
            self._plan_layer(layer, owners[layer])
        self.planned.copy_(self._staged, non_blocking=True)
        if self.planned.is_cuda:  # the stream replay() runs on must be this one
            self._staged_done = torch.cuda.Event()
            self._staged_done.record(torch.cuda.current_stream(self.planned.device))
        self._due = set(range(layers))
        self.steps += 1

    def _plan_layer(self, layer: int, owners: list[int]) -> None:
        cache, idx, dev = self.cache, self.cache.index, self.cache.device
        store, writes = cache.stores[layer], []
        for s, owner in enumerate(owners):
            self._sync_row(layer, s)
            if owner == cache.rank:  # count it, position and score set; k/v: the step's
                pos = torch.full((1,), idx.seen[layer][s], dtype=torch.int64, device=dev)
                store.append(s, self._blank, self._blank, pos)
                # Appending only adds pages here: without windows the offset stays 0, and a
                # fork leaves a sequence's partly filled last page private (no copy on write).
                old, row = self.built[layer][s], (tuple(store.tables[s]), 0, store.lens[s])
                assert old is not None and store.off[s] == 0 and row[0][:len(old[0])] == old[0]
                self.built[layer][s] = row  # the step's write marks the slot
                i = row[2] - 1
                writes.append(row[0][i // store.page_size] * store.page_size
                              + i % store.page_size)
            idx.add(layer, s, owner, 1)
            idx.advance(layer, s, 1)
        # a slot nobody writes this step: non-owners rewrite what it holds there
        spare = next(i for i in range(len(writes) + 1) if i not in writes)
        mine = iter(writes)
        for s, owner in enumerate(owners):
            own = owner == cache.rank
            self._staged[0, layer, s] = next(mine) if own else spare
            self._staged[1, layer, s] = int(own)

    def _sync_row(self, layer: int, seq: int) -> None:
        """Rebuild the mask row of (layer, seq) if its store changed since it was built."""
        st = self.cache.stores[layer]
        if not st.uniform(seq):  # unreachable without eviction, which is refused
            raise ValueError(f"sequence {seq}: heads hold different tokens (layer {layer})")
        row, old = (tuple(st.tables[seq]), st.off[seq], st.lens[seq]), self.built[layer][seq]
        if old is None or old[1:] != row[1:] or row[0][:len(old[0])] != old[0]:
            self._rebuild(layer, seq)
        self.built[layer][seq] = row

    def _rebuild(self, layer: int, seq: int) -> None:
        m = self.member[layer][seq]
        m.zero_()
        for lo, hi in self.cache.stores[layer].runs(seq):
            m[lo:hi] = True

    def _read_flags(self) -> Tensor | None:
        """The sticky flags as of the last step (CPU), or as of the step before it (GPU:
        read from the copy the last plan launched, so the host never waits for the step
        in flight; a step's flag is raised two plans later)."""
        if not self.flags.is_cuda:
            return self.flags.clone()
        prev = self._flag_copy
        host = torch.empty(self.flags.shape, dtype=torch.bool, pin_memory=True)
        host.copy_(self.flags, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.flags.device))
        self._flag_copy = (host, event)
        if prev is None:
            return None
        prev[1].synchronize()
        return prev[0]

    def _flag_error(self, flags: Tensor | None) -> ValueError | None:
        for layer, (differ, bad) in enumerate([] if flags is None else flags.tolist()):
            if differ:
                return differ_error(layer, "a graphed")
            if bad:
                return ValueError(f"decode: k or v of layer {layer} held NaN or inf at a "
                                  f"graphed step; that token was not stored (reset the "
                                  f"sequences and make a new GraphedDecode)")
        return None

    def check(self) -> None:
        """Raise on every rank if a step so far raised a flag (waits for the device)."""
        agree("GraphedDecode.check", self.cache.group,
              self._flag_error(self.flags.to("cpu")))

    # ---------------------------------------------------------------- device
    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The planned step of `layer` (device only; see the module doc)."""
        c = self.cache.config
        layer = check_index("layer", layer, c.num_layers)
        for name, x, heads in (("q", q, c.q_heads), ("k", k, c.kv_heads), ("v", v, c.kv_heads)):
            check_tensor(name, x, c, heads, 1)
            if x.shape[0] != c.max_seqs:
                raise ValueError(f"{name} must hold all {c.max_seqs} sequences, got "
                                 f"{tuple(x.shape)}")
        traced = torch.compiler.is_compiling() or (q.is_cuda and
                                                   torch.cuda.is_current_stream_capturing())
        if traced:
            self.captured = True
        elif layer in self._due:
            self._due.discard(layer)
        else:
            raise ValueError(f"GraphedDecode.attend: layer {layer} was not planned for this "
                             f"step (call plan() once per token step, then attend each layer)")
        # eager on the CPU a peer's failure times out (bounded waits); a graph holds plain calls
        return self._step(layer, q, k, v, bounded=not traced)

    def _step(self, layer: int, q: Tensor, k: Tensor, v: Tensor, bounded: bool) -> Tensor:
        cache, st = self.cache, self.cache.stores[layer]
        b, _, hq, d = q.shape
        hkv = k.shape[2]
        ad = acc_dtype(st.k.dtype)
        qg = (q[:, 0].to(ad) * self.scale).reshape(b, hkv, hq // hkv, d)
        qg = qg.transpose(0, 1).reshape(hkv, -1, d)  # [Hkv, B * G, D]
        keep = self.member[layer]
        acc: Partial | None = None
        for lo in range(0, st.k.shape[1], self.chunk):  # fixed at capture
            hi = min(lo + self.chunk, st.k.shape[1])
            s = torch.bmm(qg, st.k[:, lo:hi].to(ad).transpose(1, 2))
            if self.softcap:
                s = torch.tanh(s / self.softcap) * self.softcap
            s = s.reshape(hkv, b, hq // hkv, hi - lo)
            s = s.masked_fill(~keep[None, :, None, lo:hi], float("-inf"))
            lse = torch.logsumexp(s, -1)  # [Hkv, B, G]
            p = probs(s, lse).reshape(hkv, -1, hi - lo)  # one V chunk for every sequence
            part = Partial(torch.bmm(p, st.v[:, lo:hi].to(ad)).reshape(*lse.shape, d), lse)
            if acc is None:
                acc = part
            else:
                merge_into(acc, part)
        assert acc is not None
        out = acc.out.transpose(0, 1).reshape(b, hq, d)
        lse = acc.lse.transpose(0, 1).reshape(b, hq)
        if cache.world > 1:
            out, lse, differ = merge_across_ranks(out, lse, cache.group, cache.world,
                                                  cache.config.merge, digest(q, k, v),
                                                  bounded=bounded)
            assert differ is not None
            self.flags[layer, 0].logical_or_(differ)
        total, _ = own_token(Partial(out, lse), q, k, v, self.scale, self.softcap)
        if self.sinks is not None:
            total = with_sink(total, self.sinks)
        self._store(layer, k, v)
        return total.out.unsqueeze(1).to(q.dtype)

    def _store(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Write the new k/v into the planned slot where this rank owns it (elsewhere the
        spare slot gets its own values back) and mark it in the mask."""
        st, slot = self.cache.stores[layer], self.planned[0, layer]
        own = self.planned[1, layer] != 0
        if self.cache.config.check_finite:
            bad = ~(torch.isfinite(k).all() & torch.isfinite(v).all())
            self.flags[layer, 1].logical_or_(bad)
            own = own & ~bad
        for pool, new in ((st.k, k), (st.v, v)):
            x = new[:, 0].transpose(0, 1).to(pool.dtype)  # [Hkv, B, D]
            kept = pool.index_select(1, slot)
            pool.index_copy_(1, slot, torch.where(own[None, :, None], x, kept))
        m = self.member[layer]
        m.index_put_((self._rows, slot), m[self._rows, slot] | own)
