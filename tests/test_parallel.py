"""The all-gather schedule, Ulysses and hybrid (2-D) meshes: exact against a float64
reference (forward, lse, every gradient, sinks included) at worlds 1-4 and 6, every layout,
causal / non-causal, packed documents and windows, GQA with fewer K/V heads than the Ulysses
degree, MQA, odd head dims; `CommStats` equals `plan()` for every option; bad meshes, head
counts and options that differ across ranks fail on every rank."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
from test_varlen import _run_case

import ringmem
from ringmem.heads import kv_heads
from ringmem.layouts import PLAIN_LAYOUTS
from ringmem.plan import option_name, parse_option
from ringmem.reference import dense_mask, masked_reference
from ringmem.testing import SpawnError, spawn


def _options(world: int, hq: int) -> list[tuple[int, str]]:
    """Every (Ulysses degree, ring schedule) a world can run for hq query heads."""
    out = []
    for u in range(1, world + 1):
        if world % u or hq % u:
            continue
        for s in ("kv", "q", "allgather") if u < world else ("kv",):
            out.append((u, s))
    return out


def _exact(rank: int, world: int) -> None:
    base = dict(causal=True, window=(-1, -1), softcap=None, sinks=False, docs=None,
                per_chunk=2, backend="torch")
    heads = [(4, 4), (4, 1), (8, 2), (12, 4)] if world > 1 else [(4, 2)]
    i = 0
    for (hq, hkv), layout in itertools.product(heads, PLAIN_LAYOUTS + ("document",)):
        for u, sched in _options(world, hq):
            if (hq, hkv) == (12, 4) and u < 3:  # the non-uniform head split needs u >= 3
                continue
            variants = [dict(), dict(causal=False, dim=5)]
            if (hq, hkv) == (4, 1):  # documents, windows, sinks, softcap with MQA
                variants = [dict(docs="random", sinks=True),
                            dict(window=(3, -1), softcap=2.0, dim=5)]
            for extra in variants:
                case = {**base, "layout": layout, "schedule": sched, "ulysses": u,
                        "heads": (hq, hkv), **extra}
                if layout == "document":
                    case["docs"] = "random"
                _run_case(rank, world, case, seed=1000 * world + i)
                i += 1


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_option_exact(world: int) -> None:
    spawn(_exact, world, timeout=600)


def _mesh_exact(rank: int, world: int, shape: tuple[int, int]) -> None:
    """A user's mesh (a pair of groups and a DeviceMesh): the same result as the plain ring
    over the whole group, to fp64 rounding, and the same as `ulysses=u` on the group."""
    u, r = shape
    ranks = list(range(world))
    ug = rg = None
    for j in range(r):  # every rank creates every group (default synchronisation)
        g = dist.new_group(ranks[j * u:(j + 1) * u])
        ug = g if rank // u == j else ug
    for i in range(u):
        g = dist.new_group(ranks[i::u])
        rg = g if rank % u == i else rg
    from torch.distributed.device_mesh import init_device_mesh
    dmesh = init_device_mesh("cpu", (r, u), mesh_dim_names=("ring", "ulysses"))
    gen = torch.Generator().manual_seed(3)
    s = 4 * world
    q, k, v = (torch.randn(2, s, h, 6, generator=gen, dtype=torch.float64) for h in (6, 3, 3))
    for layout, sched in itertools.product(PLAIN_LAYOUTS, ("kv", "q", "allgather")):
        loc = [ringmem.shard(t, layout=layout).requires_grad_() for t in (q, k, v)]
        for t in (q, k, v):  # the mesh's sequence-parallel order is the group's here
            assert torch.equal(ringmem.shard(t, layout=layout, mesh=(ug, rg)), ringmem.shard(
                t, layout=layout))
        ref = ringmem.ring_attention(*loc, layout=layout, schedule=sched)
        ref.square().sum().backward()
        want = [ref.detach()] + [t.grad.clone() for t in loc]
        full = [t.clone().requires_grad_() for t in (q, k, v)]  # and vs the dense float64
        dense = masked_reference(*full, dense_mask(s, causal=True))[0]
        dense.square().sum().backward()
        for a, b in zip(want, [dense.detach()] + [t.grad for t in full]):
            assert (a - ringmem.shard(b, layout=layout)).abs().max() < 1e-12, (layout, sched)
        for mesh in ((ug, rg), dmesh):
            for t in loc:
                t.grad = None
            out = ringmem.ring_attention(*loc, layout=layout, schedule=sched, mesh=mesh)
            out.square().sum().backward()
            for name, a, b in zip(("out", "dq", "dk", "dv"), [out.detach()] +
                                  [t.grad for t in loc], want):
                assert (a - b).abs().max() < 1e-12, (shape, layout, sched, name)


@pytest.mark.parametrize("shape", [(2, 2)])
def test_user_meshes(shape: tuple[int, int]) -> None:
    spawn(_mesh_exact, shape[0] * shape[1], shape, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(2, 3), (3, 2)])
def test_meshes_of_six(shape: tuple[int, int]) -> None:
    """2 x 3 and 3 x 2 meshes on 6 ranks (spawned on 2 cores: slow)."""
    spawn(_mesh_exact, 6, shape, timeout=900)


def _bytes(rank: int, world: int) -> None:
    fails = []
    for layout, causal, (hq, hkv), dtype, lse in itertools.product(
            PLAIN_LAYOUTS, (True, False), ((4, 4), (4, 1)), (torch.float32, torch.bfloat16),
            (False, True)):
        for u, sched in _options(world, hq):
            g = torch.Generator().manual_seed(5)
            s = 4 * world
            q = torch.randn(2, s, hq, 8, generator=g).to(dtype)
            k, v = (torch.randn(2, s, hkv, 8, generator=g).to(dtype) for _ in range(2))
            leaves = [ringmem.shard(t, layout=layout).requires_grad_() for t in (q, k, v)]
            stats = ringmem.CommStats()
            out = ringmem.ring_attention(*leaves, causal=causal, layout=layout,
                                         schedule=sched, ulysses=u, stats=stats,
                                         return_lse=lse)
            (out[0] if lse else out).sum().backward()
            name = option_name(u, world, sched)
            est = ringmem.plan(tuple(leaves[0].shape), tuple(leaves[1].shape), world=world,
                               dtype=dtype, causal=causal, layout=layout, ulysses=u,
                               schedule=sched, device_type="cpu", backward=True,
                               return_lse=lse).schedules[name]
            for phase in ("fwd", "bwd"):
                got = {i: x for i, x in stats.per_step(phase, ring=True).items()
                       if x != (0, 0)}
                a2a = stats.total(phase, "a2a")
                want = {i: x for i, x in enumerate(est.steps[phase][rank]) if x != (0, 0)}
                if got != want or tuple(a2a) != est.a2a[phase][rank]:
                    fails.append(f"{name} {layout} causal={causal} H={hq}/{hkv} {dtype} "
                                 f"lse={lse} {phase} rank {rank}: measured {got} a2a {a2a} "
                                 f"!= plan {want} a2a {est.a2a[phase][rank]}")
    assert not fails, "\n".join(fails[:10])


@pytest.mark.parametrize("world", [2, 3, 4])
def test_measured_bytes_equal_the_plan(world: int) -> None:
    spawn(_bytes, world, timeout=600)


def test_kv_heads_replicate_only_as_needed() -> None:
    assert kv_heads(8, 8, 2) == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert kv_heads(8, 2, 2) == ((0,), (1,))
    assert kv_heads(8, 2, 4) == ((0,), (0,), (1,), (1,))  # fewer K/V heads than ranks
    assert kv_heads(4, 1, 4) == ((0,),) * 4               # MQA
    # 12 query heads over 3 ranks read K/V heads 0,0,0,1 | 1,1,2,2 | 2,3,3,3: not GQA-
    # uniform on ranks 0 and 2, so they get one K/V head per query head (never all 12)
    assert kv_heads(12, 4, 3) == ((0, 0, 0, 1), (1, 2), (2, 3, 3, 3))
    with pytest.raises(ValueError, match="must divide the number of query heads"):
        kv_heads(6, 2, 4)


def test_plan_names_and_choices() -> None:
    for u, s in ((1, "kv"), (1, "allgather"), (2, "q"), (8, "kv")):
        assert parse_option(option_name(u, 8, s), 8) == (u, s)
    p = ringmem.plan((1, 4096, 32, 128), (1, 4096, 8, 128), world=8, ulysses="auto",
                     interconnect="nvswitch")
    assert set(p.schedules) == {"kv", "q", "allgather", "ulysses", *(
        f"ulysses{u}+{s}" for u in (2, 4) for s in ("kv", "q", "allgather"))}
    assert p.choice in p.schedules and p.schedules[p.choice].time_s == pytest.approx(
        min(e.time_s for e in p.schedules.values()), rel=0.011)
    # 2 nodes x 8: pure Ulysses sends (u-1)/u of every tensor over the slow inter-node
    # link; keeping the all-to-all inside the node and the ring across must win
    p = ringmem.plan((1, 8192, 32, 128), (1, 8192, 8, 128), world=16, ulysses=(8, 16),
                     interconnect="nvswitch", inter_node="ib", gpus_per_node=8)
    assert p.schedules["ulysses8+kv"].time_s < p.schedules["ulysses"].time_s, str(p)
    with pytest.raises(ValueError, match="ulysses must be"):
        ringmem.plan((1, 8, 4, 8), (1, 8, 4, 8), world=4, ulysses=3)
    with pytest.raises(ValueError, match="inter_node link"):
        ringmem.plan((1, 8, 4, 8), (1, 8, 4, 8), world=4, gpus_per_node=2)


def _errors(rank: int, world: int) -> None:
    x = [torch.randn(1, 4, 6, 8) for _ in range(3)]

    def expect(match: str, **kw) -> None:
        with pytest.raises((ValueError, TypeError), match=match):
            ringmem.ring_attention(*x, **kw)

    expect("ulysses must be a degree dividing the group size 4, got 3", ulysses=3)
    expect("Ulysses degree 4 must divide the number of query heads", ulysses=4)
    expect("ulysses must be an int degree or 'auto'", ulysses="2")
    expect("mesh must be a", mesh=(1, 2))
    expect("give either group or mesh", group=dist.group.WORLD, mesh=(None, None))
    # options that differ across ranks: named, on every rank (not a hang)
    expect("ulysses", ulysses=2 if rank == 0 else 1)
    expect("schedule", schedule="allgather" if rank == 1 else "kv", ulysses=2)
    # the head check of one rank is everyone's error
    y = [torch.randn(1, 4, 6 if rank == 0 else 4, 8) for _ in range(3)]
    with pytest.raises(ValueError):
        ringmem.ring_attention(*y, ulysses=2)


def test_bad_meshes_and_mismatches_fail_on_every_rank() -> None:
    spawn(_errors, 4, timeout=300)


def test_allgather_with_a_dead_peer_names_it() -> None:
    """A rank that never joins the all-gather: the others fail naming the fetch, no hang."""
    with pytest.raises(SpawnError, match="fetch|ring_attention"):
        spawn(_one_missing, 2, timeout=120, pg_timeout=5)


def _one_missing(rank: int, world: int) -> None:
    import os
    os.environ["RINGMEM_TIMEOUT"] = "3"
    x = [ringmem.shard(torch.randn(1, 8, 2, 4)) for _ in range(3)]
    if rank == 1:
        return  # skips the call
    ringmem.ring_attention(*x, schedule="allgather")
