"""Partial attention and the log-sum-exp merge: the one place this math lives.

A partial result over a subset of keys is `Partial(out, lse)`: out = softmax-weighted
values over that subset, lse = log sum exp of its scores, with lse shaped like out without
its last dim (out [..., D], lse [...]). Two partials over disjoint key sets merge exactly:
lse = logaddexp(lse1, lse2), out = out1 exp(lse1 - lse) + out2 exp(lse2 - lse). A row that
has seen no key carries lse = -inf and out = 0, and merges as "nothing".

Everything accumulates in `acc_dtype` (fp32, fp64 for fp64 inputs). Users: the torch block
backend (`probs`), the ring's accumulators (`merge_into`), decode's per-rank pass over the
paged pool and over recalled tier entries (`attend`), the cross-rank merges and the
eviction scorers (`probs`).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor


class Partial(NamedTuple):
    """out [..., D] and lse [...] (natural log; -inf where no key was seen)."""
    out: Tensor
    lse: Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def empty(lead: Sequence[int], d: int, dtype: torch.dtype, device: torch.device) -> Partial:
    """The partial over no key: out = 0 [*lead, d], lse = -inf [*lead], in acc dtype."""
    ad = acc_dtype(dtype)
    return Partial(torch.zeros(*lead, d, dtype=ad, device=device),
                   torch.full(tuple(lead), float("-inf"), dtype=ad, device=device))


def _finite(x: Tensor) -> Tensor:
    """-inf -> 0: the shift for rows that saw nothing (no inf - inf)."""
    return torch.where(torch.isneginf(x), torch.zeros_like(x), x)


def merge_into(acc: Partial, blk: Partial) -> None:
    """Merge `blk` into the accumulator `acc` in place (acc in fp32/fp64; views allowed,
    e.g. a transposed lse)."""
    bl = blk.lse.to(acc.lse.dtype)
    new = torch.logaddexp(acc.lse, bl)
    ref = _finite(new)
    a = torch.exp(acc.lse - ref).unsqueeze(-1)
    b = torch.exp(bl - ref).unsqueeze(-1)
    acc.out.mul_(a).addcmul_(blk.out.to(acc.out.dtype), b)
    acc.lse.copy_(new)


def merge(parts: Sequence[Partial]) -> Partial:
    """Several partials over disjoint keys -> one, in acc dtype."""
    if not parts:
        raise ValueError("merge needs at least one partial, got none")
    first = parts[0]
    acc = empty(first.lse.shape, first.out.shape[-1], first.out.dtype, first.out.device)
    for p in parts:
        merge_into(acc, p)
    return acc


def sink_partial(like: Partial, sink: Tensor) -> Partial:
    """An attention sink (GPT-OSS) as a partial shaped like `like`: out 0, lse = sink, one
    more term in every row's softmax denominator that has no value. sink broadcasts over
    like.lse (e.g. [Hq] against [..., Hq])."""
    return Partial(torch.zeros_like(like.out), sink.to(like.lse.dtype).expand_as(like.lse))


def with_sink(p: Partial, sink: Tensor) -> Partial:
    """`p` merged with its sink partial (`sink_partial`); the result in acc dtype."""
    return merge([p, sink_partial(p, sink)])


def merge_weighted(out: Tensor, lse: Tensor, dim: int = 0) -> Partial:
    """Merge partials stacked along `dim` (out [..., D], lse [...]) in one pass."""
    m = _finite(lse.amax(dim, keepdim=True))
    w = torch.exp(lse - m)
    tot = w.sum(dim)
    o = (out * w.unsqueeze(-1)).sum(dim) / tot.clamp_min(1e-30).unsqueeze(-1)
    return Partial(o, torch.where(tot > 0, m.squeeze(dim) + torch.log(tot.clamp_min(1e-30)),
                                  torch.full_like(tot, float("-inf"))))


def probs(s: Tensor, lse: Tensor) -> Tensor:
    """exp(s - lse) over the last dim of s; rows with lse = -inf get 0, not nan."""
    return torch.exp(s - _finite(lse).unsqueeze(-1))


def from_scores(s: Tensor, v: Tensor) -> Partial:
    """Scaled scores s [..., n] (-inf: masked) and values v [..., n, D] -> the partial."""
    lse = torch.logsumexp(s, -1) if s.shape[-1] else torch.full_like(s[..., 0], -torch.inf)
    return Partial(torch.matmul(probs(s, lse), v), lse)


def attend(q: Tensor, k: Tensor, v: Tensor, scale: float, *,
           runs: Sequence[tuple[int, int]] | None = None,
           head_runs: Sequence[Sequence[tuple[int, int]]] | None = None,
           valid: Tensor | None = None, chunk: int = 8192,
           logits: list[Tensor] | None = None, softcap: float = 0.0) -> Partial:
    """One query's partial attention over K/V pools, per KV head.

    q [Hq, D]; k, v [Hkv, n, D]. Which keys: `runs` (slot ranges [lo, hi) shared by every
    head, read in place), `head_runs` (per-head ranges, heads holding different tokens),
    or `valid` [Hkv, n] bool (gathered entries with holes), or all n. Returns
    Partial(out [Hq, D], lse [Hq]) in acc dtype. `logits`: an empty list receives, per KV
    head, the scaled scores [G, n_h] in the order read (eviction uses them). `softcap` > 0:
    scores become softcap * tanh(score / softcap) (Gemma 2).
    """
    if head_runs is not None:  # one pass per head, each over its own tokens
        g = q.shape[0] // k.shape[0]
        parts = [attend(q[h * g:(h + 1) * g], k[h:h + 1], v[h:h + 1], scale, runs=r,
                        chunk=chunk, logits=logits, softcap=softcap)
                 for h, r in enumerate(head_runs)]
        return Partial(torch.cat([p.out for p in parts]), torch.cat([p.lse for p in parts]))
    if valid is not None:
        return _attend_masked(q, k, v, valid, scale, softcap)
    return _attend_runs(q, k, v, scale, [(0, k.shape[1])] if runs is None else runs, chunk,
                        logits, softcap)


def _cap(s: Tensor, softcap: float) -> Tensor:
    return torch.tanh(s / softcap) * softcap if softcap else s


def _attend_masked(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, scale: float,
                   softcap: float = 0.0) -> Partial:
    hq, d = q.shape
    hkv = k.shape[0]
    ad = acc_dtype(k.dtype)
    qg = (q.to(ad) * scale).reshape(hkv, hq // hkv, d)
    s = _cap(torch.bmm(qg, k.to(ad).transpose(1, 2)), softcap)  # [Hkv, G, n]
    s = s.masked_fill(~valid.to(s.device).unsqueeze(1), float("-inf"))
    p = from_scores(s, v.to(ad))
    return Partial(p.out.reshape(hq, d), p.lse.reshape(hq))


def _attend_runs(q: Tensor, k: Tensor, v: Tensor, scale: float,
                 runs: Sequence[tuple[int, int]], chunk: int,
                 logits: list[Tensor] | None, softcap: float = 0.0) -> Partial:
    """Online softmax over the runs, one 2-D matmul per head and token chunk: each head's
    range is contiguous, while a batched matmul over the strided head dim copies its
    operands (measured 4x slower)."""
    hq, d = q.shape
    hkv = k.shape[0]
    g, ad = hq // hkv, acc_dtype(k.dtype)
    qg = (q.to(ad) * scale).to(k.dtype).reshape(hkv, g, d)  # scale folded into q
    m = torch.full((hkv, g), float("-inf"), dtype=ad, device=q.device)
    l = torch.zeros_like(m)
    acc = torch.zeros(hkv, g, d, dtype=ad, device=q.device)
    kept: list[Tensor] = []
    for lo, hi in runs:
        for c in range(lo, hi, chunk):
            n = min(hi, c + chunk) - c
            s = torch.empty(hkv, g, n, dtype=k.dtype, device=q.device)
            for h in range(hkv):
                torch.matmul(qg[h], k[h, c:c + n].T, out=s[h])
            s = _cap(s.to(ad), softcap)  # [Hkv, G, n]
            if logits is not None:
                kept.append(s)
            m_new = torch.maximum(m, s.amax(-1))
            alpha = torch.exp(m - m_new)  # m = -inf at first: exp(-inf) = 0
            p = torch.exp(s - m_new.unsqueeze(-1)).to(v.dtype)
            l = l * alpha + p.to(ad).sum(-1)
            pv = torch.empty(hkv, g, d, dtype=v.dtype, device=q.device)
            for h in range(hkv):
                torch.matmul(p[h], v[h, c:c + n], out=pv[h])
            acc = acc * alpha.unsqueeze(-1) + pv.to(ad)
            m = m_new
    if logits is not None:
        full = (torch.cat(kept, -1) if kept
                else torch.zeros(hkv, g, 0, dtype=ad, device=q.device))
        logits.extend(full.unbind(0))
    seen = l > 0
    out = torch.where(seen.unsqueeze(-1), acc / l.clamp_min(1e-30).unsqueeze(-1), acc)
    lse = torch.where(seen, m + torch.log(l.clamp_min(1e-30)), m)
    return Partial(out.reshape(hq, d), lse.reshape(hq))
