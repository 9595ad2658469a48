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
from ..comm import RingComm
from ..layouts import positions
from ..partial import Partial, merge
from ..ring import RingSpec, ring_forward
from .checks import check_index, check_scale, check_tensor

if TYPE_CHECKING:
    from .sharded import ShardedKVCache


def prefill_chunk(cache: ShardedKVCache, layer: int, q: Tensor, k: Tensor, v: Tensor, *,
                  seq: int, n_valid: int | None, softmax_scale: float | None,
                  backend: str) -> Tensor:
    """`ShardedKVCache.prefill_chunk` (see there)."""
    c, idx = cache.config, cache.index
    n_loc = q.shape[1] if isinstance(q, Tensor) and q.dim() == 4 else -1
    layer, seq, start, n_valid, scale, impl = _checked(cache, layer, q, k, v, seq, n_valid,
                                                       softmax_scale, backend, n_loc)
    held = [int((start + positions(c.layout, r, cache.world, n_loc) < start + n_valid).sum())
            for r in range(cache.world)]
    idx.check_room(layer, seq, held)  # before any work, identically on every rank
    parts = []
    if start > 0:  # the cached prefix, spread over the ranks: the chunk's Q travels
        parts.append(_prefix_pass(cache, layer, seq, q, RingSpec(c.layout, False, scale,
                                                                 impl, "q")))
    spec = RingSpec(c.layout, True, scale, impl, "kv")
    parts.append(ring_forward(q, k, v, spec, RingComm(cache.group, "fwd", None, q.device)))
    # ring results are out [1, S, H, D], lse [1, H, S]: the lse's transpose lines up
    out, lse = merge([Partial(o, l.transpose(1, 2)) for o, l in parts]) if len(parts) > 1 \
        else (parts[0][0], parts[0][1].transpose(1, 2))
    # cache the real tokens of my part; every rank counts every rank's
    pos = start + positions(c.layout, cache.rank, cache.world, n_loc)
    keep = pos < start + n_valid
    mine = keep.nonzero().flatten().to(k.device)
    cache.stores[layer].append(seq, k[0, mine], v[0, mine], pos[keep].to(k.device))
    for r in range(cache.world):
        idx.add(layer, seq, r, held[r])
    idx.advance(layer, seq, n_valid)
    if cache.eviction is not None:  # the observation window, then maybe a compression
        cache.eviction.on_prefill(layer, seq, q[0, mine], lse[0, mine], pos[keep], scale)
    return out.to(q.dtype)


def _checked(cache: ShardedKVCache, layer: int, q: Tensor, k: Tensor, v: Tensor, seq: int,
             n_valid: int | None, softmax_scale: float | None, backend: str, n_loc: int
             ) -> tuple[int, int, int, int, float, Backend]:
    """The arguments checked on every rank together (one `agree`): (layer, seq, start,
    n_valid, scale, backend)."""
    c, error, impl = cache.config, None, None
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
        impl = get_backend(backend, q.device, q.dtype, c.head_dim)
        start = cache.index.seen[layer][seq]
        if cache.tiers is not None:  # a full tier store fails here, on every rank
            cache.tiers.flush(layer, seq)
    except Exception as e:  # noqa: BLE001 (any type: raised on every rank by agree)
        error, layer, seq, start, n_valid, scale = e, -1, -1, -1, -1, 0.0
    agree("prefill_chunk", cache.group, error, layer=layer, seq=seq,
          start=start, **{"q.shape": tuple(q.shape) if error is None else None},
          n_valid=n_valid, softmax_scale=scale, backend=backend)
    return layer, seq, start, n_valid, scale, impl


def _prefix_pass(cache: ShardedKVCache, layer: int, seq: int, q: Tensor,
                 spec: RingSpec) -> tuple[Tensor, Tensor]:
    """The chunk's queries against the cached prefix on every rank (ring, Q travels);
    once per KV head when heads hold different tokens (per-head eviction)."""
    store, c, idx = cache.stores[layer], cache.config, cache.index
    comm = RingComm(cache.group, "fwd", None, q.device)
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
