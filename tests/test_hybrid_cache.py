"""Hybrid caches (sliding-window layers beside global ones, as Gemma 3): eviction, tiers,
save/load and extend_local act on the global layers; windowed layers keep their window.

References: float64 dense attention (windowed or full) from the test's own K/V where
nothing is dropped (no eviction, or tiers that recall every page); the world-1 cache with
the same policy where tokens are dropped (the global top-k is exact across ranks)."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.distributed as dist

from ringmem import unshard
from ringmem.cache import CacheConfig, PageCorruptError, ShardedKVCache, TierPolicy
from ringmem.cache.tiers import persist
from ringmem.eviction import EvictionPolicy, KeyNorm, SnapKV
from ringmem.generations import current
from ringmem.testing import spawn

from _damage import flip_record_byte
from _tolerance import check_close

HQ, HKV, D, PS = 4, 2, 8, 4
WINDOWS = (-1, 8, 8, -1)  # layers 0 and 3 global; the last layer is windowed elsewhere
GLOBAL = [0, 3]
N_PROMPT, STEPS, CHUNK = 30, 6, 12  # CHUNK: a multiple of every world size tested


def _cfg(dtype: torch.dtype, windows: tuple[int, ...] = WINDOWS) -> CacheConfig:
    return CacheConfig(num_layers=len(windows), q_heads=HQ, kv_heads=HKV, head_dim=D,
                       capacity=64, page_size=PS, dtype=dtype, windows=windows)


def _data(layer: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """q [n, Hq, D], k, v [n, Hkv, D] of one layer by global position (every rank alike)."""
    g = torch.Generator().manual_seed(100 + layer)
    return tuple(torch.randn(N_PROMPT + STEPS, h, D, generator=g, dtype=torch.float64)
                 .to(dtype) for h in (HQ, HKV, HKV))


def _dense(q, k, v, left: int) -> torch.Tensor:
    """float64 causal attention of every position over [p - left, p] (left -1: all)."""
    n, g = q.shape[0], HQ // HKV
    kk, vv = (t.double().repeat_interleave(g, 1) for t in (k, v))
    s = torch.einsum("qhd,khd->hqk", q.double(), kk) / math.sqrt(D)
    i = torch.arange(n)
    ok = i[None, :] <= i[:, None]
    if left >= 0:
        ok &= i[None, :] >= i[:, None] - left
    return torch.einsum("hqk,khd->qhd", s.masked_fill(~ok, float("-inf")).softmax(-1), vv)


def _policy(scorer, alloc: str, budget: int = 6) -> EvictionPolicy:
    return EvictionPolicy(scorer=scorer, budget=budget, sinks=1, recent=2, observe=4,
                          decode_every=2, allocation=alloc)


def _prefill(cache: ShardedKVCache, data: list) -> list[torch.Tensor]:
    """Chunk by chunk through every layer (as a model runs); per layer the outputs [n, Hq, D]."""
    outs: list[list[torch.Tensor]] = [[] for _ in data]
    for lo in range(0, N_PROMPT, CHUNK):
        n = min(CHUNK, N_PROMPT - lo)
        for layer, (q, k, v) in enumerate(data):
            loc = [cache.shard_chunk(torch.cat([x[lo:lo + n], x.new_zeros(CHUNK - n,
                                                                          *x.shape[1:])])[None])
                   for x in (q, k, v)]
            o = cache.prefill_chunk(layer, *loc, n_valid=n)
            outs[layer].append(unshard(o.contiguous(), 1, group=cache.group,
                                       layout=cache.config.layout)[0, :n])
    return [torch.cat(o) for o in outs]


def _decode(cache: ShardedKVCache, data: list, t: int) -> list[torch.Tensor]:
    return [cache.decode(layer, q[None, t:t + 1], k[None, t:t + 1], v[None, t:t + 1])[0, 0]
            for layer, (q, k, v) in enumerate(data)]


def _gather(obj):
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _held(cache: ShardedKVCache) -> list[list[list[int]]]:
    """Per layer, per KV head: every position held over all ranks, sorted."""
    st = cache.stores
    mine = [[st[lay].pos[h, st[lay].head_slots(0, h)].tolist() for h in range(HKV)]
            for lay in range(len(st))]
    rows = _gather(mine)
    return [[sorted(p for r in rows for p in r[lay][h]) for h in range(HKV)]
            for lay in range(len(st))]


def _check_windows(cache: ShardedKVCache, total: int) -> None:
    """Windowed layers hold exactly their last `left` positions, where the tracker says."""
    held = _held(cache)
    for lay, left in enumerate(WINDOWS):
        if left < 0:
            continue
        assert held[lay] == [list(range(total - left, total))] * HKV, (lay, held[lay])
        st = cache.stores[lay]
        assert st.pos[0, st.head_slots(0, 0)].tolist() == \
            cache.windows.positions(lay, 0, cache.rank), lay


def _check_stats(cache: ShardedKVCache) -> None:
    stats = cache.eviction.stats()
    for lay, left in enumerate(WINDOWS):
        s = stats[f"layer{lay}"]
        assert s["windowed"] == (left >= 0) and s["window"] == left, s
        if left >= 0:
            assert s["compressions"] == 0 and s["evicted"] == 0, s
        else:
            assert s["compressions"] > 0 and s["evicted"] > 0, s
    if cache.tiers is not None:  # demotion only comes from eviction
        keys = _gather([list(k) for k in cache.tiers.store.keys()]
                       + [list(k) for k in cache.tiers.pending])
        assert {k[0] for r in keys for k in r} <= set(GLOBAL), keys
        assert any(r for r in keys), "nothing was demoted"


# --------------------------------------------------------------- nothing lost
def _exact(rank: int, world: int, alloc: str, root: str) -> None:
    """Eviction demotes, every page is recalled: each layer equals its dense reference;
    save after prefill + 2 steps, load, and the resumed decode equals the uninterrupted."""
    data = [_data(lay, torch.float64) for lay in range(len(WINDOWS))]
    refs = [_dense(*data[lay], left) for lay, left in enumerate(WINDOWS)]
    pol = _policy(SnapKV(), alloc)

    def tiers() -> TierPolicy:
        return TierPolicy(host_pages=64, recall=1000)
    a = ShardedKVCache(_cfg(torch.float64), eviction=pol, tiers=tiers())
    pre = _prefill(a, data)
    for lay in range(len(WINDOWS)):
        assert torch.allclose(pre[lay], refs[lay][:N_PROMPT], atol=1e-10), lay
    recs = a.compress()
    assert {r.layer for r in recs} == set(GLOBAL), recs
    got = [_decode(a, data, t) for t in range(N_PROMPT, N_PROMPT + 2)]
    a.save(root, model_id="test/hybrid")
    b = ShardedKVCache.load(root, _cfg(torch.float64), model_id="test/hybrid", eviction=pol,
                            tiers=tiers())
    assert b.windows.state() == a.windows.state()
    for t in range(N_PROMPT + 2, N_PROMPT + STEPS):
        want, got_b = _decode(a, data, t), _decode(b, data, t)
        assert all(torch.equal(x, y) for x, y in zip(want, got_b)), f"resumed step {t}"
        got.append(got_b)
    for i, outs in enumerate(got):
        for lay, o in enumerate(outs):
            err = (o - refs[lay][N_PROMPT + i]).abs().max()
            assert err < 1e-10, f"{alloc} layer {lay} step {i}: {err}"
    _check_windows(b, N_PROMPT + STEPS)
    _check_stats(a)
    for c in (a, b):
        c.close()


# --------------------------------------------------------------- hard eviction
def _dropping(rank: int, world: int, alloc: str, case: str, dtype: torch.dtype) -> dict:
    """Prefill, compress, decode with hard eviction: outputs and held positions. `case`
    "fp64": SnapKV on float64 data; "fp32": KeyNorm on float32 data, run in `dtype`."""
    data = [tuple(x.to(dtype) for x in _data(lay, torch.float64 if case == "fp64"
                                             else torch.float32))
            for lay in range(len(WINDOWS))]
    # SnapKV pools over the neighbours a rank holds (its docstring): kernel 1, no pooling,
    # keeps the global top-k independent of the world size
    scorer = SnapKV(kernel=1) if case == "fp64" else KeyNorm()
    cache = ShardedKVCache(_cfg(dtype), eviction=_policy(scorer, alloc))
    outs = _prefill(cache, data)
    cache.compress()
    steps = [torch.stack(_decode(cache, data, t)) for t in range(N_PROMPT, N_PROMPT + STEPS)]
    _check_windows(cache, N_PROMPT + STEPS)
    _check_stats(cache)
    return {"prefill": outs, "decode": torch.stack(steps), "held": _held(cache)}


def _references(alloc: str) -> dict:
    """World-1 runs of the same policies: "fp64" (SnapKV, float64), "fp32-ref" (the float32
    data in a float64 cache) and "fp32-base" (the same in a float32 cache)."""
    return {"fp64": _dropping(0, 1, alloc, "fp64", torch.float64),
            "fp32-ref": _dropping(0, 1, alloc, "fp32", torch.float64),
            "fp32-base": _dropping(0, 1, alloc, "fp32", torch.float32)}


def _compare(rank: int, world: int, alloc: str, refs: dict, root: str) -> None:
    _exact(rank, world, alloc, root)
    got = _dropping(rank, world, alloc, "fp64", torch.float64)
    ref = refs["fp64"]
    assert got["held"] == ref["held"], f"{alloc} fp64: kept sets differ from world 1"
    for what in ("prefill", "decode"):
        for g, r in zip(got[what], ref[what]):
            assert (g - r).abs().max() < 1e-10, f"{alloc} fp64 {what} vs world 1"
    got = _dropping(rank, world, alloc, "fp32", torch.float32)
    ref, base = refs["fp32-ref"], refs["fp32-base"]
    assert got["held"] == ref["held"] == base["held"], f"{alloc} fp32: kept sets differ"
    for what in ("prefill", "decode"):
        for i, (g, r, b) in enumerate(zip(got[what], ref[what], base[what])):
            msg = check_close(f"{alloc} fp32 {what} {i}", g, r, b, torch.float32)
            assert msg is None, msg


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("alloc", ["uniform", "global"])
def test_hybrid_eviction_tiers_exact_and_equal_world_one(tmp_path, world: int,
                                                         alloc: str) -> None:
    spawn(_compare, world, alloc, _references(alloc), str(tmp_path), timeout=180)


# --------------------------------------------------------------- checkpoints and errors
def _checkpoints(rank: int, world: int, root: str) -> None:
    """The window state survives save/load per rank; a windows mismatch, a tampered window
    state and a damaged record raise on every rank; a windowed layer cannot be compressed
    or extended locally (every rank raises)."""
    data = [_data(lay, torch.float32) for lay in range(len(WINDOWS))]
    pol = _policy(KeyNorm(), "uniform")
    a = ShardedKVCache(_cfg(torch.float32), eviction=pol, tiers=TierPolicy(host_pages=64))
    _prefill(a, data)
    a.compress()
    _decode(a, data, N_PROMPT)
    with pytest.raises(ValueError, match=r"layer 1 has a sliding window \(config.windows\[1\]"
                                         r"=8\).*never compressed"):
        a.compress(layer=1)
    assert {r.layer for r in a.compress(layer=3)} <= {3}
    with pytest.raises(ValueError, match="layer 2 has a sliding window .*extend_local"):
        a.extend_local(2, 0, *(x[:1] for x in data[2][1:]), torch.tensor([99]))
    a.save(root, model_id="test/hybrid")
    b = ShardedKVCache.load(root, _cfg(torch.float32), model_id="test/hybrid", eviction=pol,
                            tiers=TierPolicy(host_pages=64))
    for lay in (1, 2):
        for r in range(world):
            assert b.windows.positions(lay, 0, r) == a.windows.positions(lay, 0, r)
        st = b.stores[lay]
        assert st.pos[0, st.head_slots(0, 0)].tolist() == b.windows.positions(lay, 0, rank)
    want, got = _decode(a, data, N_PROMPT + 1), _decode(b, data, N_PROMPT + 1)
    assert all(torch.equal(x, y) for x, y in zip(want, got))
    for c in (a, b):
        c.close()
    # a cache of other windows (a plain cache, or other window sizes) is refused
    for windows in ((-1, -1, -1, -1), (-1, 8, 6, -1)):
        with pytest.raises(ValueError, match=r"checkpoint: windows is \[-1, 8, 8, -1\], this "
                                             r"cache has"):
            ShardedKVCache.load(root, _cfg(torch.float32, windows), model_id="test/hybrid",
                                eviction=pol, tiers=TierPolicy(host_pages=64))
    # rank 1's window state altered (its manifest still self-consistent): the replicated
    # state differs across ranks, which the load names on every rank
    path = current(root) / "rank00001.json"
    if rank == 1:
        keep = path.read_text()
        man = json.loads(keep)
        man.pop("crc32")
        man["state"]["windows"][1][0][0] = man["state"]["windows"][1][0][0][1:]
        man["crc32"] = persist._manifest_crc(man)
        path.write_text(json.dumps(man))
    dist.barrier()
    with pytest.raises(ValueError, match="come from different saves"):
        ShardedKVCache.load(root, _cfg(torch.float32), model_id="test/hybrid", eviction=pol,
                            tiers=TierPolicy(host_pages=64))
    if rank == 1:
        path.write_text(keep)
        flip_record_byte(root, 1, 2)  # a windowed layer
    dist.barrier()
    err = PageCorruptError if rank == 1 else ValueError
    with pytest.raises(err, match="corrupt" if rank == 1 else "rejected"):
        ShardedKVCache.load(root, _cfg(torch.float32), model_id="test/hybrid", eviction=pol,
                            tiers=TierPolicy(host_pages=64))


@pytest.mark.parametrize("world", [2, 3])
def test_hybrid_checkpoint_window_state_and_faults(tmp_path, world: int) -> None:
    spawn(_checkpoints, world, str(tmp_path), timeout=120)


# --------------------------------------------------------------- extend_local
def _extend(rank: int, world: int) -> None:
    """Global layers filled by extend_local (rank r: positions r, r + world, ...) + sync,
    windowed ones by prefill_chunk; eviction demotes, every page is recalled: decode
    equals dense attention."""
    data = [_data(lay, torch.float64) for lay in range(len(WINDOWS))]
    cache = ShardedKVCache(_cfg(torch.float64), eviction=_policy(KeyNorm(), "global"),
                           tiers=TierPolicy(host_pages=64, recall=1000))
    mine = torch.arange(rank, N_PROMPT, world)
    for lay, (_q, k, v) in enumerate(data):
        if lay in GLOBAL:
            cache.extend_local(lay, 0, k[mine], v[mine], mine)
    cache.sync()
    for lo in range(0, N_PROMPT, CHUNK):  # the windowed layers, as a model's prefill would
        n = min(CHUNK, N_PROMPT - lo)
        for lay in (1, 2):
            loc = [cache.shard_chunk(torch.cat([x[lo:lo + n], x.new_zeros(CHUNK - n,
                                                                          *x.shape[1:])])[None])
                   for x in data[lay]]
            cache.prefill_chunk(lay, *loc, n_valid=n)
    for lay in range(len(WINDOWS)):
        assert cache.next_position(0, lay) == N_PROMPT, lay
    assert [cache.seq_len(0, lay) for lay in GLOBAL] == [N_PROMPT] * 2
    recs = cache.compress()
    assert {r.layer for r in recs} == set(GLOBAL) and all(r.evicted for r in recs), recs
    for t in range(N_PROMPT, N_PROMPT + STEPS):
        for lay, (o, (q, k, v)) in enumerate(zip(_decode(cache, data, t), data)):
            ref = _dense(q[:t + 1], k[:t + 1], v[:t + 1], WINDOWS[lay])[t]
            assert (o - ref).abs().max() < 1e-10, (lay, t)
    _check_windows(cache, N_PROMPT + STEPS)
    cache.close()


@pytest.mark.parametrize("world", [2, 3])
def test_extend_local_on_global_layers_of_a_hybrid_cache(world: int) -> None:
    spawn(_extend, world, timeout=120)
