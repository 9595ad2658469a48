"""Decode attention over the host tier where it lives (`TierPolicy(attend="host" | "auto")`).

Every demoted page of (layer, seq) in the host tier is read in place: KV head h of a page in
slot s of a segment is rows [(s * Hkv + h) * P, + n_h) of the segment's [S, Hkv, P, D]
tensors, n_h the head's entries in that page (a prefix: a head's empty slots come last).
The compiled CPU kernel (`backends/cpu_backend.py`) attends them, all KV heads and pages
of a segment in one call; float64 pages (tests) and CPUs without the kernel take the torch
path over the same rows. Only the partial (out [Hq, D], lse [Hq]) moves to the query's
device, where the decode step merges it with the hot partial by lse: exact attention over
hot + pending + host pages, whatever the recall budget.

The cost rule of "auto" (`use_host`): attending in place reads every host page once on the
host; recalling moves the `recall` best pages over the link and attends them on the
device. Host wins when host_bytes / host_gbps <= recalled_bytes / link_gbps.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ...partial import Partial, attend, merge
from .host import Page
from .store import TierStore


def use_host(store: TierStore, layer: int, seq: int, recall: int, page_bytes: int) -> bool:
    """The "auto" cost rule for one step of (layer, seq)."""
    pages = len(store.host_pages(layer, seq))
    if pages == 0:
        return False
    p = store.policy
    return pages * page_bytes / p.host_gbps <= min(recall, pages) * page_bytes / p.link_gbps


def host_partial(store: TierStore, layer: int, seq: int, q: Tensor, scale: float,
                 softcap: float = 0.0) -> tuple[Partial | None, int]:
    """(the exact partial of q [Hq, D] over (layer, seq)'s host pages, on q's device, or
    None without any; the K/V bytes read)."""
    held = store.host_pages(layer, seq)
    if not held:
        return None, 0
    hkv, ps = store.kv_heads, store.page_size
    qh = q.detach().to("cpu")
    segs: dict[int, tuple[Page, list[int]]] = {}
    for i, seg, slot in held:
        segs.setdefault(i, (seg, []))[1].append(slot)
    parts, nbytes = [], 0
    for seg, slots in segs.values():
        counts = (seg.pos[torch.tensor(slots)] >= 0).sum(-1).tolist()  # [pages][Hkv]
        runs = [[((s * hkv + h) * ps, (s * hkv + h) * ps + c[h]) for s, c in zip(slots, counts)
                 if c[h]] for h in range(hkv)]
        nbytes += sum(b - a for r in runs for a, b in r) * 2 * seg.k.shape[-1] \
            * seg.k.element_size()
        parts.append(_rows(qh, seg.k, seg.v, runs, scale, softcap))
    got = merge(parts)
    return Partial(got.out.to(q.device), got.lse.to(q.device)), nbytes


def _rows(q: Tensor, k: Tensor, v: Tensor, runs: list[list[tuple[int, int]]], scale: float,
          softcap: float) -> Partial:
    """q [Hq, D] over row runs of pools k, v [..., D] read as [R, D] rows, per KV head."""
    from ...backends import get_backend
    from ...backends.cpu_backend import DTYPES, CpuBackend
    d = k.shape[-1]
    if k.dtype in DTYPES and bool(torch.isfinite(q).all()):
        ext = get_backend("cpu", torch.device("cpu"), k.dtype, d).kernel()
        if ext is not None:
            bounds = torch.tensor([x for r in runs for x in r], dtype=torch.long).reshape(-1, 2)
            offsets = torch.tensor([0] + [len(r) for r in runs]).cumsum(0)
            return CpuBackend.rows(ext, q, k, v, bounds, offsets, scale, softcap=softcap)
    # the torch path: each head's rows gathered (padded, masked)
    flat_k, flat_v = k.reshape(-1, d), v.reshape(-1, d)
    idx = [torch.cat([torch.arange(a, b) for a, b in r]) if r else torch.zeros(0, dtype=torch.long)
           for r in runs]
    width = max(1, max(len(i) for i in idx))
    valid = torch.zeros(len(runs), width, dtype=torch.bool)
    kk = torch.zeros(len(runs), width, d, dtype=k.dtype)
    vv = torch.zeros_like(kk)
    for h, i in enumerate(idx):
        kk[h, :len(i)], vv[h, :len(i)], valid[h, :len(i)] = flat_k[i], flat_v[i], True
    return attend(q, kk, vv, scale, valid=valid, softcap=softcap)
