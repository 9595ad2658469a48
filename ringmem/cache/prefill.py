"""Chunked prefill into a sharded cache: a chunk of a prompt, sharded over the ranks by the
layout, attends to the whole cached prefix (wherever it lives: schedule `q`, the chunk's
queries travel) and causally to itself (ring attention); the two partials merge by lse;
then its K/V are stored where the tokens live. Activation memory is bounded by the chunk.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..agree import agree
from ..backends import Backend, get_backend
from ..call import check_extras
from ..comm import RingComm
from ..layouts import positions
from ..masking import Mask
from ..partial import Partial, merge, sink_partial
from ..plan import ring_hop
from ..ring import RingSpec, ring_forward
from .checks import check_finite, check_index, check_scale, check_tensor
from .window import evict, window_prefix

if TYPE_CHECKING:
    from .paged import PagedStore
    from .parts import Parts


def prefill_chunk(cache: Parts, layer: int, q: Tensor, k: Tensor, v: Tensor, *,
                  seq: int | list[int], n_valid: int | list[int] | None,
                  softmax_scale: float | None, backend: str, softcap: float | None = None,
                  sinks: Tensor | None = None) -> Tensor:
    """`ShardedKVCache.prefill_chunk` (see there). `seq` a list: the rows' tokens packed
    one after another, each row attending to the prefix they share (one pass for all) and
    causally to its own tokens (a document mask)."""
    c, idx = cache.config, cache.index
    n_loc = q.shape[1] if isinstance(q, Tensor) and q.dim() == 4 else -1
    layer, seqs, start, lens, scale, impl, cap = _checked(
        cache, layer, q, k, v, seq, n_valid, softmax_scale, backend, n_loc, softcap, sinks)
    left, rows = c.window(layer), _Rows(start, lens)
    # a windowed layer keeps only positions >= end - left: the chunk's older tokens are
    # never stored, and the cached ones older than that are dropped once attended
    low = [e - left if left >= 0 else 0 for e in rows.ends]
    kept = [rows.kept(positions(c.layout, r, cache.world, n_loc), low)
            for r in range(cache.world)]  # per rank, per row: positions it stores
    drops = ([cache.windows.drops(layer, s, lo) for s, lo in zip(seqs, low)]
             if left >= 0 else None)
    row, pos = rows.locate(positions(c.layout, cache.rank, cache.world, n_loc))
    parts = []
    if start > 0 and left >= 0:  # the window before the chunk, gathered (small)
        prefix = window_prefix(cache, layer, seqs[0], q, pos, left, scale, cap)
        if prefix is not None:
            parts.append(prefix)
    elif start > 0:  # the cached prefix, spread over the ranks: the chunk's Q travels
        parts.append(_prefix_pass(cache, layer, seqs[0], q, RingSpec(
            c.layout, False, scale, impl, "q", softcap=cap)))
    docs = None if len(seqs) == 1 else ((*rows.cu, n_loc * cache.world),)
    mask, sched = Mask(causal=True, window=(left, -1), docs=docs), c.prefill_schedule
    # the direction that reaches a window's owners first, as ring_attention's loop
    hop = ring_hop(c.layout, cache.world, n_loc, n_loc, mask, sched)
    spec = RingSpec(c.layout, mask, scale, impl, sched, softcap=cap, hop=hop)
    parts.append(ring_forward(q, k, v, spec, RingComm(cache.group, "fwd", None, q.device,
                                                     op="prefill_chunk")))
    # ring results are out [1, S, H, D], lse [1, H, S]: the lse's transpose lines up
    parts = [Partial(o, l.transpose(1, 2)) for o, l in parts]
    if sinks is not None:  # one more term in every row's denominator, in the same merge
        parts.append(sink_partial(parts[0], sinks))
    out, lse = merge(parts) if len(parts) > 1 else parts[0]
    for i, s in enumerate(seqs):
        if drops is not None:
            evict(cache, layer, s, drops[i])
        # cache the real tokens of my part of the row; every rank counts every rank's
        keep = (row == i) & (pos >= low[i])
        mine = keep.nonzero().flatten().to(k.device)
        cache.stores[layer].append(s, k[0, mine], v[0, mine], pos[keep].to(k.device))
        for r in range(cache.world):
            idx.add(layer, s, r, len(kept[r][i]))
            if left >= 0:
                cache.windows.add(layer, s, r, kept[r][i])
        idx.advance(layer, s, lens[i])
        if cache.eviction is not None:  # the observation window, then maybe a compression
            cache.eviction.on_prefill(layer, s, q[0, mine], lse[0, mine], pos[keep], scale)
    return out.to(q.dtype)


class _Rows:
    """Rows packed in a chunk: row i holds chunk positions [cu[i], cu[i + 1]), global
    positions start + (p - cu[i]); positions >= cu[-1] are padding (row -1)."""

    def __init__(self, start: int, lens: list[int]) -> None:
        self.start, self.cu = start, [0]
        for n in lens:
            self.cu.append(self.cu[-1] + n)
        self.ends = [start + n for n in lens]

    def locate(self, p: Tensor) -> tuple[Tensor, Tensor]:
        """(row [n] (-1: padding), global position [n]) of chunk positions p [n]."""
        cu = torch.tensor(self.cu, dtype=p.dtype)
        row = torch.searchsorted(cu, p, right=True) - 1
        row = torch.where(p < self.cu[-1], row, torch.full_like(row, -1))
        return row, self.start + p - cu[row.clamp(min=0)]

    def kept(self, p: Tensor, low: list[int]) -> list[list[int]]:
        """Per row: the global positions of chunk positions p that row keeps (>= low[i])."""
        row, pos = self.locate(p)
        return [pos[(row == i) & (pos >= lo)].tolist() for i, lo in enumerate(low)]


def _checked(cache: Parts, layer: int, q: Tensor, k: Tensor, v: Tensor,
             seq: int | list[int], n_valid: int | list[int] | None,
             softmax_scale: float | None, backend: str, n_loc: int, softcap: float | None,
             sinks: Tensor | None
             ) -> tuple[int, list[int], int, list[int], float, Backend, float]:
    """The arguments checked on every rank together (one `agree`): (layer, seqs, start,
    each row's real tokens, scale, backend, softcap (0.0: none))."""
    c, error, impl, cap, many = cache.config, None, None, 0.0, isinstance(seq, list)
    seqs, lens, same = [seq] if not many else seq, [n_valid], True
    try:  # collected, then raised on every rank together by `agree`
        layer = check_index("layer", layer, c.num_layers)
        seqs = [check_index("seq", s, c.max_seqs) for s in seqs]
        check_tensor("q", q, c, c.q_heads)
        check_tensor("k", k, c, c.kv_heads, n_loc)
        check_tensor("v", v, c, c.kv_heads, n_loc)
        if q.shape[0] != 1 or k.shape[0] != 1 or v.shape[0] != 1:
            raise ValueError(f"prefill takes one sequence at a time (batch 1), got "
                             f"q.shape {tuple(q.shape)}")
        chunk = n_loc * cache.world
        lens = _lens(seqs, n_valid, chunk, many)
        scale = check_scale(softmax_scale, c.head_dim)
        cap = check_extras(q, sinks, softcap)
        impl = get_backend(backend, q.device, q.dtype, c.head_dim,
                           bands=c.window(layer) >= 0, softcap=cap > 0)
        start = cache.index.seen[layer][seqs[0]]
        if many:  # one prefix pass serves every row: they must hold the same tokens
            same = all(cache.index.seen[layer][s] == start for s in seqs) and all(
                same_tokens(cache, layer, seqs[0], s) for s in seqs[1:])
        if c.check_finite:  # the real tokens (pads are never cached): before any work
            row, pos = _Rows(start, lens).locate(
                positions(c.layout, cache.rank, cache.world, n_loc))
            real = (row >= 0).nonzero().flatten().to(k.device)
            check_finite(f"prefill_chunk (layer {layer}, seq {seq})", k[:, real], v[:, real],
                         pos[row >= 0])
        if cache.tiers is not None:  # a full tier store fails here, on every rank
            for s in seqs:
                cache.tiers.flush(layer, s)
        short, full = _room(cache, layer, seqs, start, lens, n_loc)
    except Exception as e:  # noqa: BLE001 (any type: raised on every rank by agree)
        error, layer, start, scale, short = e, -1, -1, 0.0, 0
        seqs, lens = [-1], [-1]
    agree("prefill_chunk", cache.group, error, layer=layer,
          seq=tuple(seqs) if many else seqs[0], start=start,
          **{"q.shape": tuple(q.shape) if error is None else None},
          n_valid=tuple(lens) if many else lens[0], softmax_scale=scale, backend=backend,
          softcap=cap, **{"sinks.shape": tuple(sinks.shape) if isinstance(sinks, Tensor)
                          else None, "pages short": short, "rows share their tokens": same},
          explain={"pages short": ROOM, "rows share their tokens": SHARED})
    if short:  # short alike on every rank (else agree raised): each says its own
        raise ValueError(full)
    if not same:  # alike on every rank (else agree raised)
        raise ValueError(f"prefill_chunk: sequences {seqs} do not hold the same cached "
                         f"tokens, so they cannot share a chunk: prefill them one at a time")
    return layer, seqs, start, lens, scale, impl, cap


def _lens(seqs: list[int], n_valid: int | list[int] | None, chunk: int,
          many: bool) -> list[int]:
    """Each row's real tokens, checked (their sum fits the chunk)."""
    if not many:
        n = chunk if n_valid is None else n_valid
        if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= chunk:
            raise ValueError(f"n_valid must be an int in [1, {chunk}], got {n_valid!r}")
        return [n]
    if not seqs or len(set(seqs)) != len(seqs):
        raise ValueError(f"seq must list distinct sequences, got {seqs!r}")
    if (not isinstance(n_valid, list) or len(n_valid) != len(seqs)
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0
                       for n in n_valid) or sum(n_valid) > chunk):
        raise ValueError(f"n_valid must list each sequence's real tokens ({len(seqs)} "
                         f"positive ints summing to at most the chunk's {chunk}), got "
                         f"{n_valid!r}")
    return list(n_valid)


def same_tokens(cache: Parts, layer: int, a: int, b: int) -> bool:
    """Whether sequences a and b hold the same tokens of `layer` on this rank (and, by the
    replicated index, on every rank): shared pages, or equal K/V and positions."""
    idx, st = cache.index, cache.stores[layer]
    if idx.counts(layer, a) != idx.counts(layer, b) or st.hlens[a] != st.hlens[b]:
        return False
    if cache.windows.windowed(layer) and any(
            cache.windows.positions(layer, a, r) != cache.windows.positions(layer, b, r)
            for r in range(cache.world)):
        return False
    if not (st.uniform(a) and st.uniform(b)):  # heads packed apart: slot by slot
        return all(_equal(st, h, st.head_slots(a, h), st.head_slots(b, h))
                   for h in range(st.kv_heads))
    ps, n = st.page_size, st.lens[a]
    return all(pa == pb or _equal(st, slice(None), slice(pa * ps, pa * ps + m),
                                  slice(pb * ps, pb * ps + m))
               for i, (pa, pb) in enumerate(zip(st.tables[a], st.tables[b]))
               for m in [min(ps, n - i * ps)] if m > 0)


def _equal(st: PagedStore, h: int | slice, x: Tensor | slice, y: Tensor | slice) -> bool:
    return all(torch.equal(t[h, x], t[h, y]) for t in (st.k, st.v, st.pos))


ROOM = "KV cache capacity exceeded on some rank(s): pages each rank lacks"
"""`agree`'s explanation when ranks lack different numbers of pages for a step."""
SHARED = ("sequences packed in one chunk must hold the same cached tokens (a shared prefix) "
          "on every rank")


def _room(cache: Parts, layer: int, seqs: list[int], start: int, lens: list[int],
          n_loc: int) -> tuple[int, str]:
    """(pages this rank lacks to store its part of the chunk's rows, the error to raise):
    from its own store, so pages shared between sequences count once."""
    c, st = cache.config, cache.stores[layer]
    left, rows = c.window(layer), _Rows(start, lens)
    low = [e - left if left >= 0 else 0 for e in rows.ends]
    kept = rows.kept(positions(c.layout, cache.rank, cache.world, n_loc), low)
    need = 0
    for s, lo, add in zip(seqs, low, kept):
        drop = cache.windows.drops(layer, s, lo)[cache.rank] if left >= 0 else 0
        need += st.pages_to_grow(s, drop, len(add))
    short = max(0, need - st.free_pages)
    what = f"sequence {seqs[0]}" if len(seqs) == 1 else f"sequences {seqs}"
    return short, (f"KV cache capacity exceeded: layer {layer}, {what} needs {need} "
                   f"more page(s) on rank {cache.rank}, which has {st.free_pages} of "
                   f"{st.num_pages} free (capacity {c.capacity} tokens per rank)")


def _prefix_pass(cache: Parts, layer: int, seq: int, q: Tensor,
                 spec: RingSpec) -> tuple[Tensor, Tensor]:
    """The chunk's queries against the cached prefix on every rank (ring, Q travels);
    once per KV head when heads hold different tokens (per-head eviction)."""
    store, c, idx = cache.stores[layer], cache.config, cache.index
    comm = RingComm(cache.group, "fwd", None, q.device, op="prefill_chunk (prefix)")
    if not idx.split[layer][seq]:
        kp, vp, _ = store.view(seq)
        return ring_forward(q, kp, vp, spec, comm, kv_lens=tuple(idx.counts(layer, seq)))
    g, outs, lses = c.q_heads // c.kv_heads, [], []
    for h in range(c.kv_heads):
        kp, vp, _ = store.view(seq, h)
        lens = tuple(r[h] for r in idx.head_counts[layer][seq])
        o, l = ring_forward(q[:, :, h * g:(h + 1) * g].contiguous(), kp, vp, spec, comm,
                            kv_lens=lens)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs, 2), torch.cat(lses, 1)
