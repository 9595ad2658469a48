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
from ..api import check_extras
from ..backends import Backend, get_backend
from ..comm import RingComm
from ..layouts import positions
from ..masking import Mask
from ..partial import Partial, merge
from ..plan import ring_hop
from ..ring import RingSpec, ring_forward
from .checks import check_finite, check_index, check_scale, check_tensor
from .window import evict, window_prefix

if TYPE_CHECKING:
    from .sharded import ShardedKVCache


def prefill_chunk(cache: ShardedKVCache, layer: int, q: Tensor, k: Tensor, v: Tensor, *,
                  seq: int, n_valid: int | None, softmax_scale: float | None,
                  backend: str, softcap: float | None = None,
                  sinks: Tensor | None = None) -> Tensor:
    """`ShardedKVCache.prefill_chunk` (see there)."""
    c, idx = cache.config, cache.index
    n_loc = q.shape[1] if isinstance(q, Tensor) and q.dim() == 4 else -1
    layer, seq, start, n_valid, scale, impl, cap = _checked(
        cache, layer, q, k, v, seq, n_valid, softmax_scale, backend, n_loc, softcap, sinks)
    left = c.window(layer)
    end = start + n_valid  # the next position once this chunk is cached
    # a windowed layer keeps only positions >= end - left: the chunk's older tokens are
    # never stored, and the cached ones older than that are dropped once attended
    low = end - left if left >= 0 else 0
    kept = [_kept(start + positions(c.layout, r, cache.world, n_loc), low, end)
            for r in range(cache.world)]  # per rank: positions of the chunk it stores
    held = [len(x) for x in kept]
    drops = cache.windows.drops(layer, seq, low) if left >= 0 else None
    pos = start + positions(c.layout, cache.rank, cache.world, n_loc)
    parts = []
    if start > 0 and left >= 0:  # the window before the chunk, gathered (small)
        prefix = window_prefix(cache, layer, seq, q, pos, left, scale, cap)
        if prefix is not None:
            parts.append(prefix)
    elif start > 0:  # the cached prefix, spread over the ranks: the chunk's Q travels
        parts.append(_prefix_pass(cache, layer, seq, q, RingSpec(c.layout, False, scale,
                                                                 impl, "q", softcap=cap)))
    mask, sched = Mask(causal=True, window=(left, -1)), c.prefill_schedule
    # the direction that reaches a window's owners first, as ring_attention's loop
    hop = ring_hop(c.layout, cache.world, n_loc, n_loc, mask, sched)
    spec = RingSpec(c.layout, mask, scale, impl, sched, softcap=cap, hop=hop)
    parts.append(ring_forward(q, k, v, spec, RingComm(cache.group, "fwd", None, q.device,
                                                     op="prefill_chunk")))
    # ring results are out [1, S, H, D], lse [1, H, S]: the lse's transpose lines up
    parts = [Partial(o, l.transpose(1, 2)) for o, l in parts]
    if sinks is not None:  # one more term in every row's denominator: out 0, lse = sink
        lead = parts[0].lse.shape
        parts.append(Partial(torch.zeros_like(parts[0].out),
                             sinks.to(parts[0].lse.dtype).expand(lead)))
    out, lse = merge(parts) if len(parts) > 1 else parts[0]
    if drops is not None:
        evict(cache, layer, seq, drops)
    # cache the real tokens of my part; every rank counts every rank's
    keep = (pos < end) & (pos >= low)
    mine = keep.nonzero().flatten().to(k.device)
    cache.stores[layer].append(seq, k[0, mine], v[0, mine], pos[keep].to(k.device))
    for r in range(cache.world):
        idx.add(layer, seq, r, held[r])
        if left >= 0:
            cache.windows.add(layer, seq, r, kept[r])
    idx.advance(layer, seq, n_valid)
    if cache.eviction is not None:  # the observation window, then maybe a compression
        cache.eviction.on_prefill(layer, seq, q[0, mine], lse[0, mine], pos[keep], scale)
    return out.to(q.dtype)


def _kept(pos: Tensor, low: int, end: int) -> list[int]:
    return pos[(pos >= low) & (pos < end)].tolist()


def _checked(cache: ShardedKVCache, layer: int, q: Tensor, k: Tensor, v: Tensor, seq: int,
             n_valid: int | None, softmax_scale: float | None, backend: str, n_loc: int,
             softcap: float | None, sinks: Tensor | None
             ) -> tuple[int, int, int, int, float, Backend, float]:
    """The arguments checked on every rank together (one `agree`): (layer, seq, start,
    n_valid, scale, backend, softcap (0.0: none))."""
    c, error, impl, cap = cache.config, None, None, 0.0
    try:  # collected, then raised on every rank together by `agree`
        layer = check_index("layer", layer, c.num_layers)
        seq = check_index("seq", seq, c.max_seqs)
        check_tensor("q", q, c, c.q_heads)
        check_tensor("k", k, c, c.kv_heads, n_loc)
        check_tensor("v", v, c, c.kv_heads, n_loc)
        if q.shape[0] != 1 or k.shape[0] != 1 or v.shape[0] != 1:
            raise ValueError(f"prefill takes one sequence at a time (batch 1), got "
                             f"q.shape {tuple(q.shape)}")
        chunk = n_loc * cache.world
        n_valid = chunk if n_valid is None else n_valid
        if not isinstance(n_valid, int) or not 0 < n_valid <= chunk:
            raise ValueError(f"n_valid must be an int in [1, {chunk}], got {n_valid!r}")
        scale = check_scale(softmax_scale, c.head_dim)
        cap = check_extras(q, sinks, softcap)
        impl = get_backend(backend, q.device, q.dtype, c.head_dim,
                           bands=c.window(layer) >= 0, softcap=cap > 0)
        start = cache.index.seen[layer][seq]
        if c.check_finite:  # the real tokens (pads are never cached): before any work
            pos = positions(c.layout, cache.rank, cache.world, n_loc)
            real = (pos < n_valid).nonzero().flatten().to(k.device)
            check_finite(f"prefill_chunk (layer {layer}, seq {seq})", k[:, real], v[:, real],
                         start + pos[pos < n_valid])
        if cache.tiers is not None:  # a full tier store fails here, on every rank
            cache.tiers.flush(layer, seq)
        short, full = _room(cache, layer, seq, start, n_valid, n_loc)
    except Exception as e:  # noqa: BLE001 (any type: raised on every rank by agree)
        error, layer, seq, start, n_valid, scale, short = e, -1, -1, -1, -1, 0.0, 0
    agree("prefill_chunk", cache.group, error, layer=layer, seq=seq,
          start=start, **{"q.shape": tuple(q.shape) if error is None else None},
          n_valid=n_valid, softmax_scale=scale, backend=backend, softcap=cap,
          **{"sinks.shape": tuple(sinks.shape) if isinstance(sinks, Tensor) else None,
             "pages short": short}, explain={"pages short": ROOM})
    if short:  # short alike on every rank (else agree raised): each says its own
        raise ValueError(full)
    return layer, seq, start, n_valid, scale, impl, cap


ROOM = "KV cache capacity exceeded on some rank(s): pages each rank lacks"
"""`agree`'s explanation when ranks lack different numbers of pages for a step."""


def _room(cache: ShardedKVCache, layer: int, seq: int, start: int, n_valid: int,
          n_loc: int) -> tuple[int, str]:
    """(pages this rank lacks to store its part of the chunk, the error to raise): from
    its own store, so pages shared between sequences count once."""
    c, st = cache.config, cache.stores[layer]
    left, end = c.window(layer), start + n_valid
    low = end - left if left >= 0 else 0
    pos = start + positions(c.layout, cache.rank, cache.world, n_loc)
    add = int(((pos < end) & (pos >= low)).sum())
    drop = cache.windows.drops(layer, seq, low)[cache.rank] if left >= 0 else 0
    need = -(-(st.lens[seq] - drop + add) // c.page_size) - len(st.tables[seq])
    short = max(0, need - st.free_pages)
    return short, (f"KV cache capacity exceeded: layer {layer}, sequence {seq} needs {need} "
                   f"more page(s) on rank {cache.rank}, which has {st.free_pages} of "
                   f"{st.num_pages} free (capacity {c.capacity} tokens per rank)")


def _prefix_pass(cache: ShardedKVCache, layer: int, seq: int, q: Tensor,
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
