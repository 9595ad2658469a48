"""plan() at cluster scale: its tensor routing (`routes`, `routing.block_classes`) against
the loop's own block-by-block rules (`routing.step_block`, `used`, `held`), its link model
for many groups at once against one group at a time, and whole-sequence invariants at
1024 ranks."""
from __future__ import annotations

import random

import pytest
import torch

from ringmem.heads import kv_heads
from ringmem.links import INTERCONNECTS, Cluster, Interconnect
from ringmem.masking import Mask, make_mask
from ringmem.options import fetches, moving_side
from ringmem.plan import plan, ring_hop
from ringmem.routing import Geometry, block_classes, held, step_block, used

WINDOWS = ((-1, -1), (0, 0), (1, 0), (5, 0), (13, 0), (30, 0), (5, 7), (0, 9), (-1, 4),
           (4, -1))


def _key(pieces) -> tuple:
    return tuple((p.q.start, p.q.stop, p.k.start, p.k.stop, p.lo, p.hi,
                  None if p.b is None else (p.b.start, p.b.stop)) for p in pieces)


@pytest.mark.parametrize("world", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous", "stripe"])
def test_block_classes_are_the_loops_blocks(world, layout):
    # every block of every class equals the block the loop computes (`step_block`),
    # for causal and windowed masks, folded (Ulysses) shards, both sides, both directions
    for fold in (1, 2):
        for window in WINDOWS:
            for causal in (True, False):
                if not causal and window == (-1, -1):
                    continue
                for moving in ("kv", "q"):
                    for hop in (1, -1):
                        geo = Geometry.uniform(layout, world, 24 * fold, 24 * fold,
                                               Mask(causal, window), moving, hop, fold)
                        ids, classes = block_classes(geo)
                        for j in range(world):
                            for s in range(world):
                                assert _key(classes[int(ids[j, s])]) == _key(
                                    step_block(geo, j, s)[2]), (fold, window, causal,
                                                                moving, hop, j, s)


def test_block_classes_of_documents_and_decode_blocks():
    cu = torch.tensor([0, 17, 60, 70, 96])
    docs = make_mask(True, (-1, -1), cu, 1, "zigzag", 4, 24)
    for geo in (Geometry.uniform("zigzag", 4, 24, 24, docs, "kv"),
                Geometry.uniform("contiguous", 4, 1, 40, Mask(False), "q")):
        ids, classes = block_classes(geo)
        for j in range(4):
            for s in range(4):
                assert _key(classes[int(ids[j, s])]) == _key(step_block(geo, j, s)[2])


def _loop_steps(geo: Geometry, u: int, row: list[int], rrow: list[int]):
    """(sent, received) per rank and step by the loop's own rules, block by block."""
    r = geo.world
    ln = lambda span: 0 if span is None else span[1] - span[0]  # noqa: E731
    out = [[(0, 0)] * r for _ in range(r * u)]
    for s in range(r):
        for j in range(r):
            for i in range(u):
                sent = recv = 0
                nxt = s if geo.fetch else s + 1
                if 0 < nxt < r:
                    own = j if geo.fetch else geo.owner(j, s)
                    sent += ln(held(geo, own, nxt)) * row[i]
                    recv += ln(held(geo, geo.owner(j, nxt), nxt)) * row[i]
                if s > 0 and rrow[i]:
                    sent += ln(used(geo, j, s)) * rrow[i]
                    recv += ln(used(geo, geo.holder(j, s), s)) * rrow[i]
                out[j * u + i][s] = (sent, recv)
    return out


@pytest.mark.parametrize("world,ulysses", [(12, 1), (16, 2), (24, 3)])
@pytest.mark.parametrize("mask", ["causal", "window", "full"])
def test_plan_bytes_are_the_loops_at_larger_rings(world, ulysses, mask):
    # the routing tensors give every rank at every step what the loop's own span rules
    # (`held`, `used`: what a real call sends, tests/test_parallel.py) give, forward and
    # backward, for every ring schedule
    b, sq, hq, hkv, d = 2, 24, 6, 3, 8
    window = (30, 0) if mask == "window" else (-1, -1)
    p = plan((b, sq, hq, d), (b, sq, hkv, d), world=world, dtype=torch.float16,
             causal=mask != "full", window=window, ulysses=ulysses, backward=True)
    m = make_mask(mask != "full", window, None, b, "zigzag", world, sq)
    r, u = world // ulysses, ulysses
    hl = hq // u
    kvn = [len(h) for h in kv_heads(hq, hkv, u)]  # K/V heads per Ulysses rank
    for name, est in p.schedules.items():
        moving = moving_side(est.ring)
        geo = Geometry.uniform("zigzag", r, u * sq, u * sq, m, moving,
                               ring_hop("zigzag", r, u * sq, u * sq, m, est.ring, u), u,
                               fetches(est.ring))
        # bytes per moving row or key (fp16: 2; fp32 accumulators: 4), per Ulysses rank
        kv_row = [2 * b * n * d * 2 for n in kvn]
        for phase, q_row, ret in (("fwd", b * hl * d * 2,
                                   {"q": [b * hl * (d * 2 + 4)] * u, "kv": [0] * u}),
                                  ("bwd", b * hl * (3 * d * 2 + 4),
                                   {"q": [b * hl * d * 4] * u,
                                    "kv": [2 * b * n * d * 4 for n in kvn]})):
            row = [q_row] * u if moving == "q" else kv_row
            want = _loop_steps(geo, u, row, ret[moving])
            assert est.steps[phase] == want, (name, phase)


@pytest.mark.parametrize("topology", ["mesh", "switch", "ring", "bus"])
@pytest.mark.parametrize("duplex", [True, False])
def test_grouped_and_queued_durations_equal_one_group_at_a_time(topology, duplex):
    rng = random.Random(7)
    ic = Interconnect(name="t", topology=topology, bandwidth=1e9, latency=1e-6)
    net = Cluster(8, ic, INTERCONNECTS["ib"] if topology != "bus" else None,
                  4 if topology != "bus" else 0, duplex)
    n = 60
    src = torch.tensor([rng.randrange(8) for _ in range(n)])
    dst = torch.tensor([rng.randrange(8) for _ in range(n)])
    nbytes = torch.tensor([rng.choice([0, 1, 10**6, 3 * 10**6]) for _ in range(n)])
    group = torch.tensor([rng.randrange(5) for _ in range(n)])
    grouped = net.durations_of(src, dst, nbytes, group=group)
    queued = net.queued_durations(src, dst, nbytes, group)
    for g in range(5):
        mine = group == g
        one = net.durations_of(src[mine], dst[mine], nbytes[mine])
        assert torch.equal(grouped[mine], one)
        # queued: each message behind every message of its own or an earlier group
        upto = group <= g
        behind = net.durations_of(src[upto], dst[upto], nbytes[upto])
        assert torch.equal(queued[mine], behind[mine[upto]])


@pytest.mark.parametrize("window", [(-1, -1), (3000, 0)])
def test_plan_at_1024_ranks_computes_every_pair_once(window):
    # 1024 ranks x 256 tokens: over all ranks and steps the blocks cover exactly the
    # mask's (query, key) pairs, bytes sent equal bytes received, and no option is
    # faster than its busiest rank's compute
    world, s_local = 1024, 256
    n = world * s_local
    p = plan((1, s_local, 8, 64), (1, s_local, 8, 64), world=world, window=window,
             schedule="kv", ulysses=(1, 8))
    left = window[0] if window[0] >= 0 else n
    # query i sees keys max(0, i - left) .. i
    want = sum(min(i, left) + 1 for i in range(n))
    for name, est in p.schedules.items():
        steps = est.routes.steps["fwd"]
        assert int(steps[..., 0].sum()) == int(steps[..., 1].sum()), name
        # each of a Ulysses group's ranks computes its ring rank's pairs (its own heads)
        assert int(est.routes.pairs.sum()) == want * est.ulysses, name
        assert est.time_s >= est.compute_s > 0, name
