"""The exact cross-rank merge of decode partials: the global result is the lse-weighted
combination of every rank's (out, lse); ranks with no tokens contribute lse = -inf."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..comm import Group, gather_rows
from ..partial import merge_weighted

MERGES = ("allgather", "allreduce")


def merge_across_ranks(out: Tensor, lse: Tensor, meta: Tensor, group: Group, world: int,
                       how: str = "allgather") -> tuple[Tensor, Tensor, Tensor]:
    """Exact merge of per-rank partials out [B, Hq, D], lse [B, Hq] (fp32).

    `meta` (float64 vector, e.g. step counters) rides along and comes back as [world, m] so
    callers can check that the ranks agree without another collective.
    """
    if how not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, got {how!r}")
    if world == 1:
        return out, lse, meta.unsqueeze(0)
    b, h, d = out.shape
    if how == "allgather":
        packed = torch.cat([out.flatten().double(), lse.flatten().double(), meta])
        rows = gather_rows(packed, group, world)
        outs = rows[:, :b * h * d].to(out.dtype).reshape(world, b, h, d)
        lses = rows[:, b * h * d:b * h * (d + 1)].to(lse.dtype).reshape(world, b, h)
        o, l = merge_weighted(outs, lses)
        return o, l, rows[:, b * h * (d + 1):]
    # allreduce: max of lse (meta and -meta ride along to detect disagreement), then sums
    head = torch.cat([lse.flatten().double(), meta, -meta])
    dist.all_reduce(head, op=dist.ReduceOp.MAX, group=group)
    m = head[:b * h].to(lse.dtype).reshape(b, h)
    nm = meta.numel()
    hi, lo = head[b * h:b * h + nm], -head[b * h + nm:]
    safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    w = torch.exp(lse - safe)  # this rank's weight, 0 where it saw nothing
    body = torch.cat([(out * w.unsqueeze(-1)).flatten(), w.flatten()])
    dist.all_reduce(body, group=group)
    tot = body[b * h * d:].reshape(b, h)
    o = body[:b * h * d].reshape(b, h, d) / tot.clamp_min(1e-30).unsqueeze(-1)
    l = torch.where(tot > 0, safe + torch.log(tot.clamp_min(1e-30)), m)
    return o, l, torch.stack([hi, lo])  # rows differ iff some rank disagreed

