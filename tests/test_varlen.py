"""Packed documents, sliding windows, sinks and softcap over the ring: exact against a float64
reference that builds the full dense mask from the definitions, forward and every gradient
(the sink gradient too), at worlds 1-4, every layout (the per-document one included), both
schedules, GQA. Tolerances from a same-dtype (fp32) baseline, as in test_ring."""
from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.distributed as dist

import ringmem
from ringmem.reference import dense_mask, masked_reference
from ringmem.testing import spawn

from _tolerance import check_close

D = 8


def _docs(rng: random.Random, total: int, kind: str) -> list[int]:
    """Offsets of a packed row of `total` tokens."""
    if kind == "one":  # a row that is one document
        return [0, total]
    if kind == "ones":  # documents of length 1, then the rest
        return [0, 1, 2, 3, total]
    cuts = sorted(rng.sample(range(1, total), k=min(total - 1, 4)))
    return [0, *cuts, total]


def _lengths_doc(rng: random.Random, world: int) -> list[int]:
    """Offsets for the document layout: lengths not multiples of 2 * world, a length-1 doc
    and one spanning every rank's chunks."""
    lengths = [1, 4 * world + 3, rng.randint(2, 7), 2 * world]
    return [0, *itertools.accumulate(lengths)]


def _reference(q, k, v, keep, sinks, softcap, dout):
    """(out, lse, dq, dk, dv, dsinks) of the masked reference in q's dtype."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    s = sinks.detach().clone().requires_grad_() if sinks is not None else None
    out, lse = masked_reference(*leaves, keep, sinks=s, softcap=softcap)
    out.backward(dout)
    grads = [t.grad for t in leaves] + [s.grad if s is not None else None]
    return [out.detach(), lse.detach()] + grads


def _run_case(rank: int, world: int, case: dict, seed: int) -> None:
    layout, schedule, causal = case["layout"], case["schedule"], case["causal"]
    hq, hkv = case["heads"]
    window, softcap = case["window"], case["softcap"]
    rng = random.Random(seed)
    if layout == "document":
        cu = _lengths_doc(rng, world)
        total = cu[-1]
    else:
        chunks = 2 * world if layout == "zigzag" and world > 1 else world
        total = chunks * case["per_chunk"]
        cu = _docs(rng, total, case["docs"]) if case["docs"] else None
    batch = case.get("batch", 1)
    cus = cu
    if batch > 1 and cu is not None:  # each row its own packing
        cus = [cu, _docs(rng, total, "random")] if layout != "document" else [
            cu, [0, 2, cu[-1]]]
    g = torch.Generator().manual_seed(seed)
    dim = case.get("dim", D)
    q, k, v, dout = (torch.randn(batch, total, h, dim, generator=g, dtype=torch.float64)
                     for h in (hq, hkv, hkv, hq))
    sinks = torch.randn(hq, generator=g, dtype=torch.float64) if case["sinks"] else None
    rows = cus if batch > 1 and cu is not None else [cu] * batch
    keep = torch.stack([dense_mask(total, causal=causal, window=window, cu_seqlens=c)
                        for c in rows])
    ref = _reference(q, k, v, keep, sinks, softcap, dout)
    base = _reference(q.float(), k.float(), v.float(), keep, None if sinks is None
                      else sinks.float(), softcap, dout.float())

    kw = dict(layout=layout, cu_seqlens=cus)
    shard = lambda t: ringmem.shard(t.float(), 1, **kw).detach()  # noqa: E731
    ql, kl, vl = (shard(t).requires_grad_() for t in (q, k, v))
    sl = sinks.float().clone().requires_grad_() if sinks is not None else None
    out, lse = ringmem.ring_attention(ql, kl, vl, causal=causal, layout=layout,
                                      schedule=schedule, backend=case["backend"],
                                      cu_seqlens=cus, window=window, sinks=sl,
                                      softcap=softcap, return_lse=True,
                                      ulysses=case.get("ulysses", 1))
    out.backward(shard(dout))
    got = [ringmem.unshard(out.detach(), 1, **kw), ringmem.unshard(lse, 2, **kw),
           ringmem.unshard(ql.grad, 1, **kw), ringmem.unshard(kl.grad, 1, **kw),
           ringmem.unshard(vl.grad, 1, **kw)]
    if sl is not None:
        dsink = sl.grad.clone()
        if world > 1:
            dist.all_reduce(dsink)  # a replicated parameter: the ranks' shares add up
        got.append(dsink)
    names = ("out", "lse", "dq", "dk", "dv", "dsinks")
    for name, x, r, b in zip(names, got, ref, base):
        if name == "lse":  # rows of nothing would be -inf in all three
            x, r, b = (torch.where(torch.isinf(t), torch.zeros_like(t), t) for t in (x, r, b))
        err = check_close(name, x, r, b, torch.float32, factor=4.0)
        if err and r.abs().max() == 0:  # e.g. dq where every row sees one key: exactly 0
            err = None if x.abs().max() <= 8 * torch.finfo(torch.float32).eps else err
        assert err is None, f"{case} rank {rank}: {err}"


def _cases(world: int) -> list[dict]:
    base = dict(schedule="kv", causal=True, heads=(4, 2), window=(-1, -1), softcap=None,
                sinks=False, docs="random", per_chunk=3 if world > 1 else 8, backend="torch")
    out = []
    layouts = ("zigzag", "contiguous", "stripe", "document")
    for layout, schedule in itertools.product(layouts, ("kv", "q")):
        out.append({**base, "layout": layout, "schedule": schedule})
    for layout in layouts:
        out += [
            {**base, "layout": layout, "causal": False, "heads": (2, 2)},
            {**base, "layout": layout, "docs": "ones", "heads": (4, 1), "schedule": "q"},
            {**base, "layout": layout, "docs": "one", "sinks": True},
            {**base, "layout": layout, "window": (2, -1), "docs": None},  # window < shard
            {**base, "layout": layout, "window": (500, -1), "docs": None},  # > sequence
            {**base, "layout": layout, "causal": False, "window": (1, 3), "schedule": "q"},
            {**base, "layout": layout, "window": (4, -1), "softcap": 2.0, "sinks": True},
            {**base, "layout": layout, "batch": 2, "sinks": True, "schedule": "q"},
            {**base, "layout": layout, "backend": "sdpa", "causal": False, "window": (3, 1)},
            {**base, "layout": layout, "backend": "sdpa", "docs": "random"},
        ]
    return out


def _all_cases(rank: int, world: int) -> None:
    for i, case in enumerate(_cases(world)):
        if case["layout"] == "document" and not case["docs"]:
            case = {**case, "docs": "random"}  # the document layout always packs
        _run_case(rank, world, case, seed=100 * world + i)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_varlen_exact(world: int) -> None:
    spawn(_all_cases, world, timeout=600)


def test_window_crosses_shards_only_as_needed() -> None:
    """A causal window narrower than a shard, contiguous layout: each rank needs one
    neighbour, so the ring runs one hop in the direction that reaches it."""
    from ringmem.masking import Mask
    from ringmem.routing import Geometry, best_hop, last_step
    mask = Mask(causal=True, window=(3, -1))
    for moving in ("kv", "q"):
        hop = best_hop("contiguous", 4, 16, 16, mask, moving)
        assert last_step(Geometry.uniform("contiguous", 4, 16, 16, mask, moving, hop)) == 1
        assert last_step(Geometry.uniform("contiguous", 4, 16, 16, mask, moving, -hop)) == 3
