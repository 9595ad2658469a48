"""Sliding-window layers in a `ShardedKVCache`: the window is the layer's eviction rule.

A query at position p of a layer with left window `left` sees keys p - left .. p. Once a
sequence's next position is n, no future query needs a key before n - left, so a windowed
layer keeps only positions [n - left, n): at most `left` tokens per sequence, spread over
the ranks. Every rank knows which positions each rank holds (`WindowTracker`, replicated:
prefill places tokens by the layout, decode on the least-loaded rank, both decided alike
everywhere), so who drops how many tokens needs no communication; a rank's tokens sit in
ascending position order, so dropping the oldest is dropping the first slots. (The tracker
lives with the rest of the replicated state, in `cache/index.py`.)

A prefill chunk's queries still need the window before the chunk: those at most `left`
cached tokens are all-gathered (small: one window, not the prompt) and attended with an
explicit position mask (`window_prefix`); the chunk attends to itself through the ring with
the window as a band.

In a hybrid cache (windowed and global layers) eviction and tiers act on the global layers
only: a windowed layer is never scored or compressed, and the tokens leaving its window
are dropped, never demoted (no later query needs them). `save` / `load` checkpoint the
tracker (`state`, `load_state`) with the rest of the replicated state.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..comm import gather_rows
from ..partial import Partial, acc_dtype, from_scores

if TYPE_CHECKING:
    from .parts import Shards


def evict(cache: Shards, layer: int, seq: int, counts: list[int]) -> None:
    """Drop counts[rank] oldest tokens of (layer, seq) on every rank: this rank's store,
    the replicated index and tracker."""
    mine = counts[cache.rank]
    if mine:
        store = cache.stores[layer]
        n = store.lens[seq]
        keep = torch.arange(n, device=store.pos.device) >= mine
        store.keep(seq, [keep] * store.kv_heads)
    for r, n in enumerate(counts):
        if n:
            cache.index.remove(layer, seq, r, n)
    cache.windows.drop(layer, seq, counts)


def masked_partial(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scale: float,
                   softcap: float) -> Partial:
    """q [S, Hq, D] against k, v [N, Hkv, D] where allowed [S, N]: Partial(out [S, Hq, D],
    lse [S, Hq]) in acc dtype (GQA by grouping query heads, K/V never expanded)."""
    s_len, hq, d = q.shape
    hkv = k.shape[1]
    ad = acc_dtype(q.dtype)
    qg = q.to(ad).reshape(s_len, hkv, hq // hkv, d).permute(1, 2, 0, 3)  # [Hkv, G, S, D]
    kg = k.to(ad).permute(1, 0, 2).unsqueeze(1)  # [Hkv, 1, N, D]
    s = torch.matmul(qg, kg.transpose(-1, -2)) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~allowed.to(s.device), float("-inf"))
    p = from_scores(s, v.to(ad).permute(1, 0, 2).unsqueeze(1))  # out [Hkv, G, S, D]
    return Partial(p.out.permute(2, 0, 1, 3).reshape(s_len, hq, d),
                   p.lse.permute(2, 0, 1).reshape(s_len, hq))


def window_prefix(cache: Shards, layer: int, seq: int, q: Tensor, q_pos: Tensor,
                  left: int, scale: float, softcap: float) -> tuple[Tensor, Tensor] | None:
    """This rank's chunk queries q [1, S, Hq, D] at positions q_pos [S] against the cached
    window of (layer, seq) on every rank: (out [1, S, Hq, D], lse [1, Hq, S]), or None when
    nothing is cached. One all-gather of at most `left` tokens' K/V."""
    tracker, world = cache.windows, cache.world
    held = [tracker.positions(layer, seq, r) for r in range(world)]
    most = max(len(h) for h in held)
    if most == 0:
        return None
    k, v, _ = cache.stores[layer].view(seq)  # [1, n, Hkv, D]
    kv = torch.stack([k[0], v[0]])  # [2, n, Hkv, D]
    if world > 1:
        pad = kv.new_zeros(2, most - kv.shape[1], *kv.shape[2:])
        rows = gather_rows(torch.cat([kv, pad], 1).reshape(-1), cache.group, world)
        rows = rows.reshape(world, 2, most, *kv.shape[2:])
        kv = torch.cat([rows[r, :, :len(h)] for r, h in enumerate(held)], 1)
    k_pos = torch.tensor([p for h in held for p in h], dtype=torch.int64, device=q.device)
    qp = q_pos.to(q.device)
    allowed = (k_pos[None, :] >= qp[:, None] - left) & (k_pos[None, :] <= qp[:, None])
    part = masked_partial(q[0], kv[0], kv[1], allowed, scale, softcap)
    return part.out.unsqueeze(0), part.lse.transpose(0, 1).unsqueeze(0)
