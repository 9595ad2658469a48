"""TokenRing (`q`) vs pass-KV (`kv`) schedules: byte accounting, cost model, special shapes.

Exactness of both schedules over every layout/dtype/head config is in test_ring.py.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

import ringmem
from ringmem.layouts import PLAIN_LAYOUTS
from ringmem.masking import pieces_mask
from ringmem.reference import reference_attention
from ringmem.routing import Geometry, held, split_rows, step_block
from ringmem.testing import spawn

# CommStats == plan for kv and q (and every other option): test_parallel.py


def test_zigzag_trims_what_travels() -> None:
    # 4 ranks, zigzag, causal: after the ring wraps only half a shard is still needed
    for moving in ("q", "kv"):
        geo = Geometry.uniform("zigzag", 4, 8, 8, True, moving)
        spans = [held(geo, owner, step) for owner in range(4) for step in range(1, 4)]
        assert (0, 8) in spans and any(s in spans for s in ((0, 4), (4, 8))), spans
        assert all(s is None or s[1] - s[0] in (4, 8) for s in spans)


def test_contiguous_q_stops_travelling_when_nobody_needs_it() -> None:
    geo = Geometry.uniform("contiguous", 4, 8, 8, True, "q")
    # Q of rank 0 is needed by nobody else (every other rank's keys come later)
    assert [held(geo, 0, s) for s in (1, 2, 3)] == [None, None, None]
    assert held(geo, 3, 1) == (0, 8)


def test_split_rows_preserves_the_mask() -> None:
    for layout, world in itertools.product(PLAIN_LAYOUTS, (1, 2, 4)):
        for rank in range(world):
            pieces = step_block(Geometry.uniform(layout, world, 10, 10, True, "q"), rank, 0)[2]
            for at in (0, 3, 5, 10):
                a, b = split_rows(pieces, at)
                assert torch.equal(pieces_mask(a, 10, 10) | pieces_mask(b, 10, 10),
                                   pieces_mask(pieces, 10, 10))
                assert not (pieces_mask(a, 10, 10) & pieces_mask(b, 10, 10)).any()
                assert all(p.q.stop <= at for p in a) and all(p.q.start >= at for p in b)


@pytest.mark.parametrize("interconnect", ["nvlink"])
def test_model_prefers_q_for_mha_on_a_full_mesh(interconnect: str) -> None:
    # compute-bound long shards: TokenRing moves Q (one tensor) where kv moves K and V,
    # half the buffers, at a time within 1% of kv's
    for world, s in ((4, 16384), (8, 8192)):
        p = ringmem.plan((1, s, 32, 128), (1, s, 32, 128), world=world,
                         interconnect=interconnect)
        assert p.choice == "q", str(p)
        assert p.schedules["q"].buffer_bytes * 2 == p.schedules["kv"].buffer_bytes
    # short shards: q splits its own block in two launches (the second half hides the
    # last return), and the smaller halves cost more than the 1% tie allows
    p = ringmem.plan((1, 4096, 32, 128), (1, 4096, 32, 128), world=4,
                     interconnect=interconnect)
    assert p.schedules["q"].compute_s > p.schedules["kv"].compute_s * 1.01, str(p)
    assert p.choice == "kv", str(p)


def test_model_prefers_q_for_decode_shaped_calls() -> None:
    for ic in ringmem.INTERCONNECTS:
        p = ringmem.plan((1, 1, 32, 128), (1, 65536, 8, 128), world=8, causal=False,
                         interconnect=ic)
        assert p.choice == "q", str(p)
        assert p.schedules["q"].bytes() * 100 < p.schedules["kv"].bytes()


def test_model_prefers_kv_for_gqa_8_to_1_prefill() -> None:
    for ic, backward in itertools.product(ringmem.INTERCONNECTS, (False, True)):
        p = ringmem.plan((1, 8192, 32, 128), (1, 8192, 4, 128), world=8, interconnect=ic,
                         backward=backward)
        # K/V travel (passed on or fetched), never Q: 8x fewer bytes
        assert p.choice in ("kv", "allgather"), str(p)
        assert p.schedules["kv"].comm_s * 4 < p.schedules["q"].comm_s, str(p)


def test_plans_are_immutable_and_do_not_share_the_cache() -> None:
    """Estimates are frozen, and editing a plan's nested lists leaves the next plan alone
    (the estimates are cached)."""
    import dataclasses
    shapes = ((1, 4096, 8, 64), (1, 4096, 8, 64))
    p = ringmem.plan(*shapes, world=4)
    est = p.schedules[p.choice]
    with pytest.raises(dataclasses.FrozenInstanceError):
        est.time_s = 0.0
    before = (list(est.steps["fwd"][0]), list(est.work[0]), list(est.messages["fwd"]),
              list(est.pairs[0]), list(est.a2a["fwd"]), list(est.halves))
    est.steps["fwd"][0][0] = (-1, -1)
    est.work[0][0] = ()
    est.messages["fwd"].clear()
    est.pairs[0][0] = -1
    est.a2a["fwd"].append((1, 1))
    est.halves.clear()
    again = ringmem.plan(*shapes, world=4).schedules[p.choice]
    assert (again.steps["fwd"][0], again.work[0], again.messages["fwd"], again.pairs[0],
            again.a2a["fwd"], again.halves) == before


def test_plan_bad_arguments() -> None:
    with pytest.raises(ValueError, match="interconnect must be one of"):
        ringmem.plan((1, 8, 2, 4), (1, 8, 2, 4), world=2, interconnect="infiniband")
    with pytest.raises(ValueError, match="must be \\[B, S, H, D\\]"):
        ringmem.plan((8, 2, 4), (1, 8, 2, 4), world=2)
    with pytest.raises(ValueError, match="need equal local lengths"):
        ringmem.plan((1, 1, 2, 4), (1, 8, 2, 4), world=2, causal=True)
    with pytest.raises(ValueError, match="bandwidth must be > 0"):
        ringmem.Interconnect(name="x", topology="mesh", bandwidth=0, latency=0)
    with pytest.raises(ValueError, match="interconnect must be one of"):
        ringmem.ring_attention(*(torch.randn(1, 4, 2, 8) for _ in range(3)),
                               interconnect="infiniband")


def _decode_shaped(rank: int, world: int) -> None:
    # one query token per rank against a sharded K/V (non-causal): both schedules exact
    g = torch.Generator().manual_seed(11)
    q_all = torch.randn(2, world, 4, 16, generator=g, dtype=torch.float64)  # token r -> rank r
    k, v = (torch.randn(2, 6 * world, 2, 16, generator=g, dtype=torch.float64)
            for _ in range(2))
    ref, ref_lse = reference_attention(q_all, k, v, causal=False)
    for schedule in ringmem.SCHEDULES:
        ql = q_all[:, rank:rank + 1].clone().requires_grad_()
        kl, vl = (ringmem.shard(t, layout="contiguous").requires_grad_() for t in (k, v))
        out, lse = ringmem.ring_attention(ql, kl, vl, causal=False, layout="contiguous",
                                          schedule=schedule, return_lse=True)
        assert (out - ref[:, rank:rank + 1]).abs().max() < 1e-12, schedule
        assert (lse - ref_lse[:, :, rank:rank + 1]).abs().max() < 1e-12, schedule
        out.sum().backward()  # gradients exist and are finite (values checked in test_ring)
        assert all(torch.isfinite(t.grad).all() for t in (ql, kl, vl))


def test_decode_shaped_calls_are_exact() -> None:
    spawn(_decode_shaped, 3)


def _subgroups(rank: int, world: int) -> None:
    # a data-parallel x sequence-parallel layout: two SP groups and a DP group, all created
    # by every rank. Returns (q forward, every backward) must not need a group of their own
    # that only some ranks create (torch's group names would disagree: a hang).
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    dist.new_group([0, 2])
    dist.new_group([1, 3])
    mine = groups[rank // 2]
    g = torch.Generator().manual_seed(100 + rank // 2)
    q, k, v = (torch.randn(1, 12, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref, _ = reference_attention(*leaves, causal=True)
    ref.sum().backward()
    for schedule in ("q", "kv", "q"):  # the second q call reuses whatever the first set up
        ql, kl, vl = (ringmem.shard(t, group=mine).requires_grad_() for t in (q, k, v))
        out = ringmem.ring_attention(ql, kl, vl, group=mine, schedule=schedule)
        out.sum().backward()
        full = ringmem.unshard(out.detach(), group=mine)
        assert (full - ref).abs().max() < 1e-12, schedule
        for got, want in zip((ql, kl, vl), leaves):
            grad = ringmem.unshard(got.grad, group=mine)
            assert (grad - want.grad).abs().max() < 1e-12, schedule


def test_both_schedules_on_subgroups_beside_a_dp_group() -> None:
    spawn(_subgroups, 4, timeout=120)


def test_empty_key_block_is_skipped() -> None:
    # a rank with no keys at all (non-causal): no backend call (the CPU flash op crashes on
    # empty keys), the partial stays empty, the result comes from the other keys
    q = torch.randn(1, 4, 2, 8, dtype=torch.float64)
    e = torch.randn(1, 0, 2, 8, dtype=torch.float64)
    out, lse = ringmem.ring_attention(q, e, e, causal=False, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def _auto_agrees(rank: int, world: int) -> None:
    q, k, v = (torch.randn(1, 16, 4, 8) for _ in range(3))
    stats = ringmem.CommStats()
    with torch.no_grad():
        ringmem.ring_attention(q, k, v, schedule="auto", stats=stats)
    want = ringmem.plan(tuple(q.shape), tuple(k.shape), world=world, dtype=q.dtype,
                        device_type="cpu").choice
    channels = {r["channel"] for r in stats.records}
    assert ("ret" in channels) == (want == "q"), (want, stats.records)


def test_auto_follows_the_plan() -> None:
    spawn(_auto_agrees, 2)
