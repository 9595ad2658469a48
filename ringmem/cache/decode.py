"""Decode attention over a sharded cache: a per-rank partial, then an exact cross-rank merge.

The per-rank partial reads the paged pool in place (one batched matmul per token chunk,
online softmax in fp32). The merge is exact: the global result is the lse-weighted
combination of every rank's (out, lse); ranks with no tokens contribute lse = -inf.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..comm import Group, gather_rows
from ..merge import merge_partials

MERGES = ("allgather", "allreduce")


def paged_partial(q: Tensor, k: Tensor, v: Tensor, runs: list[tuple[int, int]], scale: float,
                  chunk: int = 8192, *, head_runs: list[list[tuple[int, int]]] | None = None,
                  logits: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """q [Hq, D]; k, v pools [Hkv, slots, D]; runs of slots -> (out [Hq, D], lse [Hq]) fp32.

    head_runs: per-head runs instead (heads that hold different tokens after a per-head
    eviction); `runs` is then ignored. logits: pass an empty list to receive, per KV head,
    the scaled scores [G, n_h] (fp32, fp64 for fp64 pools) of its tokens in run order, kept
    from this very pass (no second read of K): with the global lse after the cross-rank
    merge they give each key's exact attention probability, exp(s - lse).
    """
    if head_runs is not None:  # one pass per head, each over its own tokens
        hq, hkv = q.shape[0], k.shape[0]
        g = hq // hkv
        parts = [paged_partial(q[h * g:(h + 1) * g], k[h:h + 1], v[h:h + 1], r, scale, chunk,
                               logits=logits) for h, r in enumerate(head_runs)]
        return torch.cat([o for o, _ in parts]), torch.cat([l for _, l in parts])
    hq, d = q.shape
    hkv = k.shape[0]
    ad = torch.float64 if k.dtype == torch.float64 else torch.float32
    qg = (q.to(ad) * scale).to(k.dtype).reshape(hkv, hq // hkv, d)  # scale folded into q
    m = torch.full((hkv, hq // hkv), float("-inf"), dtype=ad, device=q.device)
    l = torch.zeros_like(m)
    acc = torch.zeros(hkv, hq // hkv, d, dtype=ad, device=q.device)
    kept: list[Tensor] = []
    for lo, hi in runs:
        for c in range(lo, hi, chunk):
            n = min(hi, c + chunk) - c
            # one 2-D matmul per head: each head's token range is contiguous, while a batched
            # matmul over the strided head dim copies its operands (measured 4x slower)
            s = torch.empty(hkv, hq // hkv, n, dtype=k.dtype, device=q.device)
            for h in range(hkv):
                torch.matmul(qg[h], k[h, c:c + n].T, out=s[h])
            s = s.to(ad)  # [Hkv, G, n]
            if logits is not None:
                kept.append(s)
            m_new = torch.maximum(m, s.amax(-1))
            alpha = torch.exp(m - m_new)  # m = -inf at first: exp(-inf) = 0
            p = torch.exp(s - m_new.unsqueeze(-1)).to(v.dtype)
            l = l * alpha + p.to(ad).sum(-1)
            pv = torch.empty(hkv, hq // hkv, d, dtype=v.dtype, device=q.device)
            for h in range(hkv):
                torch.matmul(p[h], v[h, c:c + n], out=pv[h])
            acc = acc * alpha.unsqueeze(-1) + pv.to(ad)
            m = m_new
    if logits is not None:
        full = (torch.cat(kept, -1) if kept
                else torch.zeros(hkv, hq // hkv, 0, dtype=ad, device=q.device))
        logits.extend(full.unbind(0))
    seen = l > 0
    out = torch.where(seen.unsqueeze(-1), acc / l.clamp_min(1e-30).unsqueeze(-1), acc)
    lse = torch.where(seen, m + torch.log(l.clamp_min(1e-30)), m)
    return out.reshape(hq, d), lse.reshape(hq)


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
        # merge_partials works on [B, S, H, D] / [B, H, S]: treat the batch as one sequence
        o, l = merge_partials([x.unsqueeze(0) for x in outs],
                              [x.t().unsqueeze(0) for x in lses])
        return o[0], l[0].t(), rows[:, b * h * (d + 1):]
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


def masked_partial(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, scale: float
                   ) -> tuple[Tensor, Tensor]:
    """Partial attention over gathered per-head entries with holes (recalled tier pages).

    q [Hq, D]; k, v [Hkv, n, D]; valid [Hkv, n] bool (False: an empty slot, pos = -1).
    Returns (out [Hq, D], lse [Hq]) in fp32 (fp64 for fp64 k); a head with no valid entry
    gets out = 0, lse = -inf.
    """
    hq, d = q.shape
    hkv, n = k.shape[:2]
    ad = torch.float64 if k.dtype == torch.float64 else torch.float32
    qg = (q.to(ad) * scale).reshape(hkv, hq // hkv, d)
    s = torch.bmm(qg, k.to(ad).transpose(1, 2))  # [Hkv, G, n]
    s = s.masked_fill(~valid.to(s.device).unsqueeze(1), float("-inf"))
    m = s.amax(-1, keepdim=True) if n else torch.full_like(s[..., :1], float("-inf"))
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)  # empty heads: no inf - inf
    p = torch.exp(s - m)
    l = p.sum(-1)
    out = torch.bmm(p, v.to(ad)) / l.clamp_min(1e-30).unsqueeze(-1)
    lse = torch.where(l > 0, m.squeeze(-1) + torch.log(l.clamp_min(1e-30)),
                      torch.full_like(l, float("-inf")))
    return out.reshape(hq, d), lse.reshape(hq)
