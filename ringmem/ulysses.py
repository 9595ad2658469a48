"""Ulysses re-sharding around the ring loop: all-to-all between sequence and head shards.

Before the loop, each of a Ulysses group's u ranks sends every peer the peer's share of
heads for its own tokens (K/V: only the K/V heads that peer's query heads read, see
`heads.kv_heads`); each rank then holds all u ranks' tokens for hq/u heads, sorted into
ascending global positions, and runs the ring loop across groups (`fold=u`). After it, the
output goes back the same way. Both all-to-alls are autograd functions whose backward is the
other one, so gradients take the mirrored path (a K/V head sent to two ranks has its two
gradients summed).
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.distributed as dist
from torch import Tensor

from .comm import CommStats, Group
from .heads import kv_heads
from .layouts import positions
from .masking import Mask
from .timeouts import wait_works


def _exchange(parts: list[Tensor], shapes: list[tuple[int, ...]], group: Group, me: int,
              stats: CommStats | None, phase: str, step: int) -> list[Tensor]:
    """One all-to-all: parts[i] goes to rank i of `group`, shapes[i] comes from rank i."""
    dtype, device = parts[0].dtype, parts[0].device
    send = torch.cat([p.reshape(-1) for p in parts])
    sizes_in = [int(torch.Size(s).numel()) for s in shapes]
    recv = torch.empty(sum(sizes_in), dtype=dtype, device=device)
    size = send.element_size()
    if stats is not None:
        stats.records.append({
            "phase": phase, "step": step, "channel": "a2a",
            "sent": size * sum(p.numel() for i, p in enumerate(parts) if i != me),
            "recv": size * sum(n for i, n in enumerate(sizes_in) if i != me)})
    work = dist.all_to_all_single(recv, send, sizes_in, [p.numel() for p in parts],
                                  group=group, async_op=True)
    if device.type == "cpu":
        peers = [dist.get_global_rank(group or dist.group.WORLD, i) for i in range(len(parts))
                 if i != me]
        wait_works([work], [("all-to-all", p) for p in peers], op="ulysses all-to-all",
                   rank=dist.get_rank(), timed=True, phase=phase, step=step)
    else:  # stream-ordered: the next kernel waits on the device, not the host
        work.wait()
    return [t.reshape(s) for t, s in zip(recv.split(sizes_in), shapes)]


def heads_split(x: Tensor, idx: tuple[tuple[int, ...], ...], ctl: tuple,
                phase: str = "fwd") -> Tensor:
    """x [B, L, H, D] (this rank's tokens, all heads) -> [B, u*L, len(idx[me]), D] (every
    group member's tokens, in member order, for the heads `idx[me]`)."""
    group, me, stats, r = ctl
    b, n, _, d = x.shape
    parts = [_heads(x, h) for h in idx]  # [B, L, h_i, D] each, contiguous
    got = _exchange(parts, [(b, n, len(idx[me]), d)] * len(idx), group, me, stats, phase, -1)
    return torch.cat(got, dim=1)  # [B, u*L, h, D], member order


def heads_join(g: Tensor, idx: tuple[tuple[int, ...], ...], h: int, ctl: tuple) -> Tensor:
    """The gradient of `heads_split`: g [B, u*L, len(idx[me]), D] -> [B, L, h, D] (a head
    sent to two ranks gets both gradients)."""
    group, me, stats, r = ctl
    u = len(idx)
    b, ul, _, d = g.shape
    n = ul // u
    parts = [c.contiguous() for c in g.split(n, dim=1)]
    got = _exchange(parts, [(b, n, len(hs), d) for hs in idx], group, me, stats, "bwd", r)
    acc = torch.zeros(b, n, h, d, dtype=torch.promote_types(g.dtype, torch.float32),
                      device=g.device)
    for hs, part in zip(idx, got):
        acc.index_add_(2, torch.tensor(hs, device=g.device), part.to(acc.dtype))
    return acc.to(g.dtype)


def seq_join(y: Tensor, ctl: tuple, dim: int, step: int) -> Tensor:
    """y [B, u*L, hl, D] (this rank's heads, every member's tokens) -> [B, L, u*hl, D] (this
    rank's tokens, all heads in member order); `dim` is the sequence dim (2 for an lse
    [B, hl, u*L], whose heads are dim 1)."""
    group, me, stats, r = ctl
    u = group_size(group)
    n = y.shape[dim] // u
    parts = [c.contiguous() for c in y.split(n, dim=dim)]
    got = _exchange(parts, [tuple(parts[0].shape)] * u, group, me, stats, "fwd", step)
    return torch.cat(got, dim=3 - dim)  # the heads dim


def seq_split(g: Tensor, ctl: tuple, dim: int, phase: str = "bwd") -> Tensor:
    """The inverse of `seq_join` (and its gradient): this rank's tokens, all heads -> this
    rank's heads, every member's tokens."""
    group, me, stats, r = ctl
    u = group_size(group)
    hd = 3 - dim  # the heads dim of g
    parts = [c.contiguous() for c in g.split(g.shape[hd] // u, dim=hd)]
    got = _exchange(parts, [tuple(parts[0].shape)] * u, group, me, stats, phase, -1)
    return torch.cat(got, dim=dim)


class _ToHeads(torch.autograd.Function):
    """`heads_split`, its backward `heads_join`."""

    @staticmethod
    def forward(ctx, x: Tensor, idx: tuple[tuple[int, ...], ...], ctl: tuple) -> Tensor:
        ctx.idx, ctx.ctl, ctx.h = idx, ctl, x.shape[2]
        return heads_split(x, idx, ctl)

    @staticmethod
    def backward(ctx, g: Tensor):
        return heads_join(g, ctx.idx, ctx.h, ctx.ctl), None, None


def _heads(x: Tensor, heads: tuple[int, ...]) -> Tensor:
    """x[:, :, heads], contiguous (a slice when the heads are consecutive)."""
    if list(heads) == list(range(heads[0], heads[0] + len(heads))):
        return x.narrow(2, heads[0], len(heads)).contiguous()
    return x[:, :, list(heads)].contiguous()


class _ToSeq(torch.autograd.Function):
    """`seq_join`, its backward `seq_split`."""

    @staticmethod
    def forward(ctx, y: Tensor, ctl: tuple, dim: int, step: int) -> Tensor:
        ctx.ctl, ctx.dim = ctl, dim
        return seq_join(y, ctl, dim, step)

    @staticmethod
    def backward(ctx, g: Tensor):
        return seq_split(g, ctx.ctl, ctx.dim), None, None, None


def group_size(group: Group) -> int:
    return dist.get_world_size(group)


@lru_cache(maxsize=256)
def fold_order(layout: str, mask: Mask, r: int, j: int, u: int,
               n: int) -> tuple[Tensor, Tensor] | None:
    """(index, its inverse), each [1, u*n] (one packing for every row) or [B, u*n]: the
    index sorts ring rank j's gathered tokens (member order) into ascending global
    positions. None when they already are, or positions do not matter (no mask). Cached:
    the same for every call of a shape."""
    if mask.plain and not mask.causal:
        return None
    rows = mask.docs if mask.docs is not None else (None,)
    out = []
    for cu in rows:
        pos = torch.cat([positions(layout, j * u + i, r * u, n, cu) for i in range(u)])
        out.append(torch.argsort(pos, stable=True))
    idx = torch.stack(out)
    if torch.equal(idx, torch.arange(u * n).expand_as(idx)):
        return None
    return idx, torch.argsort(idx, dim=1)


def _gather_rows(x: Tensor, idx: Tensor, dim: int = 1) -> Tensor:
    """x with its sequence dim reordered by idx [1, S] (every row alike: one contiguous
    index_select) or [B, S] (per batch row)."""
    if idx.shape[0] == 1:
        return x.index_select(dim, idx[0].to(x.device))
    shape = [1] * x.dim()
    shape[0], shape[dim] = idx.shape
    full = list(x.shape)
    return torch.take_along_dim(x, idx.to(x.device).reshape(shape).expand(full), dim=dim)


def to_heads(q: Tensor, k: Tensor, v: Tensor, sinks: Tensor | None, hq: int, hkv: int,
             ctl: tuple, order: tuple[Tensor, Tensor] | None):
    """The pre-loop all-to-all: (q, k, v, sinks) for this rank's heads, every member's
    tokens in ascending positions."""
    u = group_size(ctl[0])
    me, hl = ctl[1], hq // u
    qs = _ToHeads.apply(q, _q_heads(hq, u), ctl)
    idx = kv_heads(hq, hkv, u)
    ks, vs = (_ToHeads.apply(t, idx, ctl) for t in (k, v))
    if order is not None:
        qs, ks, vs = (_gather_rows(t, order[0]) for t in (qs, ks, vs))
    sl = None if sinks is None else sinks[me * hl:(me + 1) * hl]
    return qs, ks, vs, sl


def _q_heads(hq: int, u: int) -> tuple[tuple[int, ...], ...]:
    """The query heads of each Ulysses rank: hq / u consecutive ones."""
    hl = hq // u
    return tuple(tuple(range(i * hl, (i + 1) * hl)) for i in range(u))


def from_seq(out: Tensor, lse: Tensor | None, ctl: tuple,
             order: tuple[Tensor, Tensor] | None):
    """The inverse of `to_seq`: out [B, L, Hq, D] (and lse [B, Hq, L]) back to this rank's
    heads, every member's tokens in ascending positions, as the ring loop held them."""
    out = seq_split(out, ctl, 1, "fwd")
    lse = None if lse is None else seq_split(lse.contiguous(), ctl, 2, "fwd")
    if order is not None:
        out = _gather_rows(out, order[0])
        lse = None if lse is None else _gather_rows(lse, order[0], dim=2)
    return out, lse


def grads_to_seq(dq: Tensor, dk: Tensor, dv: Tensor, hq: int, hkv: int, ctl: tuple,
                 order: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor]:
    """The gradient of `to_heads` for q, k, v: the loop's dq, dk, dv (this rank's heads)
    back to this rank's tokens, all heads (a K/V head sent to two ranks: summed)."""
    if order is not None:  # back to member order
        dq, dk, dv = (_gather_rows(t, order[1]) for t in (dq, dk, dv))
    u = group_size(ctl[0])
    idx = kv_heads(hq, hkv, u)
    return (heads_join(dq, _q_heads(hq, u), hq, ctl), heads_join(dk, idx, hkv, ctl),
            heads_join(dv, idx, hkv, ctl))


def to_seq(out: Tensor, lse: Tensor | None, ctl: tuple, order: tuple[Tensor, Tensor] | None):
    """The post-loop all-to-all: out (and lse) back to this rank's tokens, all heads."""
    if order is not None:
        out = _gather_rows(out, order[1])
        lse = None if lse is None else _gather_rows(lse, order[1], dim=2)
    r = ctl[3]
    out = _ToSeq.apply(out, ctl, 1, r)
    if lse is not None:
        lse = _ToSeq.apply(lse.contiguous(), ctl, 2, r)
    return out, lse
