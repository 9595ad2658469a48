"""Exact global top-k over scores spread across ranks, without gathering the scores.

Radix select: scores are mapped to order-preserving unsigned 32-bit keys, and the k-th
largest key is found one byte at a time: each round all-reduces a 256-bin histogram of the
candidates' next byte (4 rounds, 1 KiB each per rank). Ties at the threshold are broken
deterministically by a distinct integer id per item (the global position; lowest first),
with a second radix select over the tied ids. Exactly min(k, total) items are kept, and the
kept set equals a single-process top-k over the concatenation of every rank's scores.

`grouped_topk_mask` runs G independent selections (one per KV head, say) in the same
collectives: each round all-reduces a [G, 256] histogram, so the number of collectives does
not grow with G: 4 score rounds + 1 tie count, plus (only when some group has a partial
tie, which every rank learns from that count) 1 max-id reduction and one round per id byte.
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


def grouped_radix_select(keys: Tensor, gid: Tensor, ks: Tensor, num_groups: int, bits: int,
                         largest: bool, group: Group, world: int) -> tuple[Tensor, Tensor]:
    """Per group g, the ks[g]-th largest (or smallest) key over all ranks (ks 1-based).

    keys [n] in [0, 2^bits), gid [n] in [0, G). Returns (threshold [G], total [G]): total
    is the group's item count over all ranks (from the first round's histogram); for groups
    with ks[g] < 1 or ks[g] > total the threshold is meaningless.
    """
    prefix = torch.zeros(num_groups, dtype=torch.int64, device=keys.device)
    remaining = ks.to(torch.int64).to(keys.device).clone()
    total = None
    cand_keys, cand_gid = keys, gid
    for shift in range(bits - 8, -1, -8):
        digit = (cand_keys >> shift) & 0xFF
        hist = torch.bincount(cand_gid * 256 + digit, minlength=num_groups * 256)
        hist = _all_reduce(hist.to(torch.int64), group, world).reshape(num_groups, 256)
        if total is None:
            total = hist.sum(1)
        order = hist.flip(1) if largest else hist  # walk from the top (or bottom) digit
        cum = torch.cumsum(order, 1)
        want = remaining.clamp(1).unsqueeze(1)
        idx = torch.searchsorted(cum, want).squeeze(1).clamp(max=255)
        below = torch.where(idx > 0, cum.gather(1, (idx - 1).clamp(min=0).unsqueeze(1))
                            .squeeze(1), torch.zeros_like(idx))
        remaining = remaining - below
        d = 255 - idx if largest else idx
        prefix = (prefix << 8) | d
        keep = digit == d[cand_gid]
        cand_keys, cand_gid = cand_keys[keep], cand_gid[keep]
    assert total is not None
    return prefix, total


def grouped_topk_mask(scores: Tensor, ids: Tensor, gid: Tensor, ks: list[int] | Tensor,
                      *, group: Group = None) -> Tensor:
    """Bool mask of this rank's items that belong to their group's global top-k.

    scores: [n] float32 (+inf marks protected items); ids: [n] non-negative int64, distinct
    within a group across all ranks (the tie-break: among equal scores the lowest ids win);
    gid: [n] int64 group of each item in [0, G); ks: [G] budgets, the same on every rank.
    Every group keeps exactly min(ks[g], its total) items.
    """
    rank, world = group_rank_world(group)
    if scores.dim() != 1 or ids.shape != scores.shape or gid.shape != scores.shape:
        raise ValueError(f"scores, ids and gid must be 1-D of the same length, got "
                         f"{tuple(scores.shape)}, {tuple(ids.shape)} and {tuple(gid.shape)}")
    # everything stays on the scores' device: NCCL all-reduces device tensors only
    dev = scores.device
    ks = torch.as_tensor(ks, dtype=torch.int64).flatten().to(dev)
    if (ks < 0).any():
        raise ValueError(f"budgets ks must be non-negative, got {ks.tolist()}")
    g = ks.numel()
    gid = gid.to(dev, torch.int64)
    if gid.numel() and (int(gid.min()) < 0 or int(gid.max()) >= g):
        raise ValueError(f"gid must lie in [0, {g}), got values in "
                         f"[{int(gid.min())}, {int(gid.max())}]")
    keys = ordered_keys(scores)
    ids = ids.to(dev, torch.int64)
    t, total = grouped_radix_select(keys, gid, ks, g, 32, True, group, world)
    above = keys > t[gid]
    ties = keys == t[gid]
    counts = torch.stack([torch.bincount(gid[above], minlength=g),
                          torch.bincount(gid[ties], minlength=g)]).to(torch.int64)
    counts = _all_reduce(counts, group, world)
    n_above, n_ties = counts[0], counts[1]
    want = ks - n_above  # tied items to keep per group (>= 1 where a selection is needed)
    active = (ks > 0) & (ks < total)
    partial = active & (want < n_ties)
    keep = above | (ties & ~partial[gid])
    if bool(partial.any()):  # the `want` lowest ids among each partial group's ties
        local_max = torch.tensor([int(ids.max()) if ids.numel() else 0], device=dev)
        max_id = int(_all_reduce(local_max, group, world, dist.ReduceOp.MAX))
        bits = 8 * max(1, -(-max_id.bit_length() // 8))  # whole bytes covering every id
        tie_ks = torch.where(partial, want, torch.zeros_like(want))
        p, _ = grouped_radix_select(ids[ties], gid[ties], tie_ks, g, bits, False, group,
                                    world)
        keep = keep | (ties & partial[gid] & (ids <= p[gid]))
    keep = torch.where((ks >= total)[gid], torch.ones_like(keep), keep)
    return keep & (ks > 0)[gid]


def global_topk_mask(scores: Tensor, positions: Tensor, k: int, *,
                     group: Group = None) -> Tensor:
    """Bool mask of this rank's items that belong to the global top-k.

    scores: [n] float32 on this rank (n may differ across ranks; +inf marks protected
    items); positions: [n] distinct non-negative global positions (int64), the tie-break:
    among equal scores the lowest positions win. k: the global budget (same on all ranks).
    """
    if scores.dim() != 1 or positions.shape != scores.shape:
        raise ValueError(f"scores and positions must be 1-D of the same length, got "
                         f"{tuple(scores.shape)} and {tuple(positions.shape)}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ValueError(f"k must be a non-negative int, got {k!r}")
    gid = torch.zeros(scores.shape, dtype=torch.int64, device=scores.device)
    return grouped_topk_mask(scores, positions, gid, [k], group=group)
