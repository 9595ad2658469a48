"""Exact global top-k over scores spread across ranks, without gathering the scores.

Radix select: scores are mapped to order-preserving unsigned 32-bit keys, and the k-th
largest key is found one byte at a time: each round all-reduces a 256-bin histogram of the
candidates' next byte (4 rounds, 1 KiB each per rank). Ties at the threshold are broken
deterministically by global position (lowest first), with a second radix select over the
tied positions. Exactly min(k, total) items are kept, and the kept set equals a
single-process top-k over the concatenation of every rank's scores.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..comm import Group, group_rank_world


def ordered_keys(scores: Tensor) -> Tensor:
    """float32 scores -> int64 keys in [0, 2^32) with the same order (NaN not allowed)."""
    if scores.dtype != torch.float32:
        raise ValueError(f"scores must be float32, got {scores.dtype}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    scores = scores + 0.0  # -0.0 -> 0.0: they compare equal, so they must share a key
    bits = scores.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    neg = bits >= 0x80000000
    # negative floats: flip all bits (larger magnitude = smaller); positive: set the sign bit
    return torch.where(neg, bits ^ 0xFFFFFFFF, bits | 0x80000000)


def _all_reduce(x: Tensor, group: Group, world: int,
                op: dist.ReduceOp = dist.ReduceOp.SUM) -> Tensor:
    if world > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def radix_select(keys: Tensor, k: int, bits: int, largest: bool, group: Group,
                 world: int) -> int:
    """The k-th largest (or smallest) key over all ranks, k 1-based; keys in [0, 2^bits)."""
    prefix, remaining = 0, k
    cand = keys
    for shift in range(bits - 8, -1, -8):
        digit = (cand >> shift) & 0xFF
        hist = _all_reduce(torch.bincount(digit, minlength=256).to(torch.int64), group, world)
        order = hist.flip(0) if largest else hist  # walk from the top (or bottom) digit
        cum = torch.cumsum(order, 0)
        idx = int(torch.searchsorted(cum, torch.tensor(remaining)))
        d = 255 - idx if largest else idx
        remaining -= int(cum[idx - 1]) if idx > 0 else 0
        prefix = (prefix << 8) | d
        cand = cand[digit == d]
    return prefix


def global_topk_mask(scores: Tensor, positions: Tensor, k: int, *,
                     group: Group = None) -> Tensor:
    """Bool mask of this rank's items that belong to the global top-k.

    scores: [n] float32 on this rank (n may differ across ranks; +inf marks protected
    items); positions: [n] distinct non-negative global positions (int64), the tie-break:
    among equal scores the lowest positions win. k: the global budget (same on all ranks).
    """
    rank, world = group_rank_world(group)
    if scores.dim() != 1 or positions.shape != scores.shape:
        raise ValueError(f"scores and positions must be 1-D of the same length, got "
                         f"{tuple(scores.shape)} and {tuple(positions.shape)}")
    if not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be a non-negative int, got {k!r}")
    keys = ordered_keys(scores.cpu())
    pos = positions.cpu().to(torch.int64)
    total = int(_all_reduce(torch.tensor([keys.numel()]), group, world))
    if k >= total:
        return torch.ones_like(scores, dtype=torch.bool)
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    t = radix_select(keys, k, 32, True, group, world)  # the k-th largest key
    above = keys > t
    ties = keys == t
    counts = _all_reduce(torch.tensor([int(above.sum()), int(ties.sum())]), group, world)
    n_above, n_ties = int(counts[0]), int(counts[1])
    want = k - n_above  # how many of the tied items to keep (>= 1)
    keep = above
    if want == n_ties:
        keep = keep | ties
    else:  # the `want` lowest positions among the ties
        local_max = torch.tensor([int(pos.max()) if pos.numel() else 0])
        max_pos = int(_all_reduce(local_max, group, world, dist.ReduceOp.MAX))
        bits = 8 * max(1, -(-max_pos.bit_length() // 8))  # whole bytes covering every position
        p = radix_select(pos[ties], want, bits, False, group, world)
        keep = keep | (ties & (pos <= p))
    return keep.to(scores.device)
