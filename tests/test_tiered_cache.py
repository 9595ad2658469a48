"""Memory tiers inside the sharded KV cache: eviction demotes (host, disk) instead of
dropping, decode recalls the pages the Quest bound ranks highest, save/load resumes.

References are independent: float64 attention over explicit per-head position sets built
from the test's own global K/V, a brute-force float64 page bound, and the cache without
tiers."""
from __future__ import annotations

import math
import tempfile

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from ringmem.cache import CacheConfig, PageCorruptError, ShardedKVCache, TierPolicy
from ringmem.eviction import H2O, EvictionPolicy, KeyNorm, SnapKV, StreamingLLM
from ringmem.partial import attend
from ringmem.testing import spawn

from _damage import flip_record_byte

HQ, HKV, D, G, PS = 4, 2, 8, 2, 4
SCALE = 1 / math.sqrt(D)


def _cfg(dtype=torch.float64, layers=1, capacity=64) -> CacheConfig:
    return CacheConfig(num_layers=layers, q_heads=HQ, kv_heads=HKV, head_dim=D,
                       capacity=capacity, page_size=PS, dtype=dtype)


def _data(seed: int, n: int, dtype: torch.dtype):
    """Global q [n, Hq, D], k, v [n, Hkv, D] by position (the same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, h, D, generator=g, dtype=torch.float64).to(dtype)
                 for h in (HQ, HKV, HKV))


def _prefill(cache, Q, K, V, n: int, chunk: int = 0) -> list[torch.Tensor]:
    """Positions [0, n) in chunks (n and chunk multiples of the world size)."""
    outs, chunk = [], chunk or 4 * cache.world
    for layer in range(cache.config.num_layers):
        for lo in range(0, n, chunk):
            parts = [cache.shard_chunk(t[None, lo:min(n, lo + chunk)]) for t in (Q, K, V)]
            outs.append(cache.prefill_chunk(layer, *parts))
    return outs


def _decode(cache, Q, K, V, t: int) -> list[torch.Tensor]:
    """Decode the token at global position t in every layer."""
    return [cache.decode(layer, Q[None, t:t + 1], K[None, t:t + 1], V[None, t:t + 1])[0, 0]
            for layer in range(cache.config.num_layers)]


def _gather(obj):
    if dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _local_positions(cache, layer: int, keys=None) -> dict[str, list[list[int]]]:
    """This rank's positions per head: hot, pending, and in demoted pages `keys`
    (default: every demoted page of the layer)."""
    st, tiers = cache.stores[layer], cache.tiers
    hot = [st.pos[h, st.head_slots(0, h)].tolist() for h in range(HKV)]
    pend = [e.pos.tolist() for e in tiers.pending.get((layer, 0), ())] or [[]] * HKV
    if keys is None:
        keys = [k for k in tiers.store.keys() if k[0] == layer]
    pages = tiers.store.recall(keys) if keys else []
    demoted = [[p for pg in pages for p in pg.pos[h].tolist() if p >= 0] for h in range(HKV)]
    return {"hot": hot, "pending": pend, "demoted": demoted}


def _union(rows: list[dict], parts=("hot", "pending", "demoted")) -> list[list[int]]:
    """Per head, every position of `parts` over all ranks (a list: repeats stay visible)."""
    return [sorted(p for r in rows for part in parts for p in r[part][h]) for h in range(HKV)]


def _attend(q, K, V, sets) -> torch.Tensor:
    """float64 attention of q [Hq, D] over, per KV head h, the positions sets[h]."""
    out = []
    for h in range(HKV):
        idx = torch.tensor(sets[h], dtype=torch.int64)
        s = q[h * G:(h + 1) * G].double() @ K[idx, h].double().T * SCALE
        out.append(s.softmax(-1) @ V[idx, h].double())
    return torch.cat(out)


def _check_capacity(cache, fails: list[str], where: str) -> None:
    st = cache.tier_stats()
    if st["host_pages"] > st["host_capacity"] or st["disk_pages"] > st["disk_capacity"]:
        fails.append(f"{where}: capacities exceeded {st}")


# --------------------------------------------------------------- everything hot
def _everything_hot(rank: int, world: int) -> None:
    n, steps = 8 * world + 4 * world, 4
    Q, K, V = _data(1, n + steps, torch.bfloat16)
    tmp = tempfile.mkdtemp()
    tiers = TierPolicy(host_pages=4, disk_pages=8, disk_dir=tmp, recall=4)
    big = EvictionPolicy(scorer=KeyNorm(), budget=1000, sinks=1, recent=1, decode_every=1)
    for ev in (None, big):  # no eviction; eviction that never fires
        plain = ShardedKVCache(_cfg(torch.bfloat16, 2), eviction=ev)
        tiered = ShardedKVCache(_cfg(torch.bfloat16, 2), eviction=ev, tiers=tiers)
        a, b = _prefill(plain, Q, K, V, n), _prefill(tiered, Q, K, V, n)
        if ev is not None:
            plain.compress()
            tiered.compress()
        for t in range(n, n + steps):
            a += _decode(plain, Q, K, V, t)
            b += _decode(tiered, Q, K, V, t)
        assert all(torch.equal(x, y) for x, y in zip(a, b)), "tiers changed a hot result"
        assert len(tiered.tiers.store) == 0 and tiered.tier_stats()["pending_entries"] == 0
        tiered.close()


@pytest.mark.parametrize("world", [1, 2, 3])
def test_everything_hot_is_bitwise_the_cache_without_tiers(world: int) -> None:
    spawn(_everything_hot, world, timeout=120)


# --------------------------------------------------------------- nothing lost
def _nothing_lost(rank: int, world: int) -> None:
    n, steps, fails = 32 * world, 6, []
    for dtype in (torch.float64, torch.bfloat16):
        Q, K, V = _data(2, n + steps, dtype)
        pol = EvictionPolicy(scorer=KeyNorm(), budget=10, sinks=2, recent=3, decode_every=2)
        tiers = TierPolicy(host_pages=2, disk_pages=64, disk_dir=tempfile.mkdtemp(),
                           recall=1000)
        cache = ShardedKVCache(_cfg(dtype, 2), eviction=pol, tiers=tiers)
        base = ShardedKVCache(_cfg(dtype, 2))  # no eviction: same tokens, all hot
        _prefill(cache, Q, K, V, n)
        _prefill(base, Q, K, V, n)
        cache.compress()
        for t in range(n, n + steps):
            got, ref = _decode(cache, Q, K, V, t), _decode(base, Q, K, V, t)
            for layer in range(2):
                want = _attend(Q[t], K, V, [list(range(t + 1))] * HKV)  # every token
                err = (got[layer].double() - want).abs().max().item()
                tol = (1e-12 if dtype == torch.float64 else
                       2 * (ref[layer].double() - want).abs().max().item() + 1e-3)
                if err > tol:
                    fails.append(f"{dtype} t={t} layer {layer}: error {err:.3g} > {tol:.3g}")
                # every position is held exactly once (hot, pending or demoted), per head
                held = _union(_gather(_local_positions(cache, layer)))
                if held != [list(range(t + 1))] * HKV:
                    fails.append(f"{dtype} t={t} layer {layer}: positions held {held}")
            _check_capacity(cache, fails, f"{dtype} t={t}")
        st = cache.tier_stats()
        if not (st["disk_pages"] > 0 and st["recalled_pages"] > 0 and st["host_pages"] > 0):
            fails.append(f"the test did not exercise both tiers: {st}")
        cache.close()
    assert not fails, fails[:5]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_demote_and_recall_everything_equals_full_attention(world: int) -> None:
    spawn(_nothing_lost, world, timeout=120)


# --------------------------------------------------------------- recall budget
def _brute_bound(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor) -> float:
    """max over heads and their query heads of sum_c max(q_c min_c, q_c max_c) * scale,
    over each head's valid keys of one page (k [Hkv, n, D], pos [Hkv, n])."""
    best = float("-inf")
    for h in range(HKV):
        keys = k[h, pos[h] >= 0].double()
        if keys.shape[0] == 0:
            continue
        lo, hi = keys.min(0).values, keys.max(0).values
        for g in range(G):
            qc = q[h * G + g].double()
            best = max(best, float(torch.maximum(qc * lo, qc * hi).sum()) * SCALE)
            # the bound bounds: no key of the page scores higher
            assert float((keys @ qc).max()) * SCALE <= best + 1e-12
    return best


def _recall_budget(rank: int, world: int) -> None:
    n, steps, budget, fails = 32 * world, 5, 2, []
    Q, K, V = _data(3, n + steps, torch.float64)
    pol = EvictionPolicy(scorer=KeyNorm(), budget=8, sinks=1, recent=2)
    caches = [ShardedKVCache(_cfg(), eviction=pol, tiers=TierPolicy(
        host_pages=3, disk_pages=32, disk_dir=tempfile.mkdtemp(), recall=budget,
        prefetch=pf)) for pf in (True, False)]
    for c in caches:
        _prefill(c, Q, K, V, n)
        c.compress()
    for t in range(n, n + steps):
        outs = [_decode(c, Q, K, V, t)[0] for c in caches]
        if not torch.equal(outs[0], outs[1]):
            fails.append(f"t={t}: prefetch changed the result")
        cache = caches[0]
        keys = [k for k in cache.tiers.store.keys() if k[0] == 0]
        pages = cache.tiers.store.recall(keys)
        bounds = [(-_brute_bound(Q[t], p.k, p.pos), key[2]) for key, p in zip(keys, pages)]
        want = [(0, 0, pid) for _, pid in sorted(bounds)[:budget]]
        got = cache.tiers.selected[(0, 0)]
        if got != want:
            fails.append(f"t={t}: recalled {got}, the bound ranks {want} highest")
        sets = _union(_gather(_local_positions(cache, 0, got)))
        ref = _attend(Q[t], K, V, sets)
        err = (outs[0] - ref).abs().max().item()
        if err > 1e-12:
            fails.append(f"t={t}: output differs from hot + pending + recalled by {err:.3g}")
        every = _attend(Q[t], K, V, [list(range(t + 1))] * HKV)
        if (outs[0] - every).abs().max().item() < 1e-9:  # the budget must leave pages out
            fails.append(f"t={t}: the recall budget recalled everything")
        # the next step recalls different pages: demote a little more
        for c in caches:
            c.compress()
    for c in caches:
        c.close()
    assert not fails, fails[:5]


def test_recall_picks_the_pages_the_bound_ranks_highest() -> None:
    spawn(_recall_budget, 2, timeout=120)


# --------------------------------------------------------------- full tier store
def _store_full(rank: int, world: int) -> None:
    n = 32 * world
    Q, K, V = _data(4, n + 1, torch.float32)
    pol = EvictionPolicy(scorer=StreamingLLM(), budget=8, sinks=1, recent=2)
    cache = ShardedKVCache(_cfg(torch.float32), eviction=pol, tiers=TierPolicy(
        host_pages=1, disk_pages=1, disk_dir=tempfile.mkdtemp(), recall=4))
    _prefill(cache, Q, K, V, n)
    with pytest.raises(ValueError, match="tier store full|rejected"):
        cache.compress()
    fails: list[str] = []
    _check_capacity(cache, fails, "after a full store")
    held = _union(_gather(_local_positions(cache, 0)))
    assert held == [list(range(n))] * HKV, "entries lost when the store filled up"
    with pytest.raises(ValueError, match="tier store full|rejected"):  # decode flushes too
        _decode(cache, Q, K, V, n)
    assert not fails, fails
    cache.close()


def test_full_tier_store_raises_on_every_rank_and_loses_nothing() -> None:
    spawn(_store_full, 2, timeout=60)


# --------------------------------------------------------------- save / load
def _resume(rank: int, world: int, root: str, scorer) -> None:
    """Save after 2 decode steps, then decode 4 more: uninterrupted vs loaded. Eviction
    every 3 steps, so a lost step counter, window or score state changes the result."""
    n, steps = 12 * world, 6
    Q, K, V = _data(5, n + steps, torch.bfloat16)
    cfg = _cfg(torch.bfloat16, 2)
    pol = EvictionPolicy(scorer=scorer, budget=10, sinks=1, recent=2, decode_every=3)

    def tiers():
        return TierPolicy(host_pages=1, disk_pages=64, disk_dir=tempfile.mkdtemp(), recall=2)

    a = ShardedKVCache(cfg, eviction=pol, tiers=tiers())
    _prefill(a, Q, K, V, n)
    a.compress()
    for t in range(n, n + 2):
        _decode(a, Q, K, V, t)
    a.save(root, model_id="test/model")
    saved = {k: v for k, v in a.tier_stats().items() if k in ("host_pages", "disk_pages")}
    want = [_decode(a, Q, K, V, t) for t in range(n + 2, n + steps)]
    b = ShardedKVCache.load(root, cfg, model_id="test/model", eviction=pol, tiers=tiers())
    st = b.tier_stats()
    assert st["host_pages"] + st["disk_pages"] == sum(saved.values()) > 0
    got = [_decode(b, Q, K, V, t) for t in range(n + 2, n + steps)]
    assert all(torch.equal(x, y) for gs, ws in zip(got, want) for x, y in zip(gs, ws)), \
        f"{scorer.name}: resumed decode differs from uninterrupted decode"
    for c in (a, b):
        c.close()


def _save_load(rank: int, world: int, root: str) -> None:
    _resume(rank, world, f"{root}/snapkv", SnapKV())  # needs the observation window
    _resume(rank, world, root, H2O())  # accumulated scores, folded prompt window
    cfg = _cfg(torch.bfloat16, 2)
    pol = EvictionPolicy(scorer=H2O(), budget=10, sinks=1, recent=2, decode_every=3)

    def tiers():
        return TierPolicy(host_pages=1, disk_pages=64, disk_dir=tempfile.mkdtemp(), recall=2)

    # mismatches raise on every rank (each its own, or the shared 'rejected' error)
    for kw, msg in ((dict(model_id="other/model"), "model_id"),
                    (dict(config=_cfg(torch.float32, 2)), "dtype"),
                    (dict(tiers=None), "demoted pages"),
                    (dict(eviction=None), "eviction")):
        args = {"config": cfg, "model_id": "test/model", "eviction": pol,
                "tiers": tiers(), **kw}
        with pytest.raises(ValueError, match=msg):
            ShardedKVCache.load(root, args.pop("config"), **args)
    if rank == 1:  # one damaged byte in rank 1's layer record
        flip_record_byte(root, 1, 1)
    dist.barrier()
    err = PageCorruptError if rank == 1 else ValueError
    with pytest.raises(err, match="corrupt" if rank == 1 else "rejected"):
        ShardedKVCache.load(root, cfg, model_id="test/model", eviction=pol, tiers=tiers())


def _load_other_world(rank: int, world: int, root: str) -> None:
    with pytest.raises(ValueError, match="world_size"):
        ShardedKVCache.load(root, _cfg(torch.bfloat16, 2), model_id="test/model")


@pytest.mark.parametrize("world", [2, 3])
def test_save_load_decode_equals_uninterrupted_decode(tmp_path, world: int) -> None:
    spawn(_save_load, world, str(tmp_path), timeout=180)
    spawn(_load_other_world, 1, str(tmp_path), timeout=60)


# --------------------------------------------------------------- local checks
def test_masked_partial_against_float64_reference() -> None:
    g = torch.Generator().manual_seed(6)
    q = torch.randn(HQ, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(HKV, 5, D, generator=g, dtype=torch.float64) for _ in range(2))
    valid = torch.tensor([[True, False, True, True, False], [False] * 5])
    out, lse = attend(q, k, v, SCALE, valid=valid)
    s = q[:G] @ k[0, valid[0]].T * SCALE
    assert torch.allclose(out[:G], s.softmax(-1) @ v[0, valid[0]], atol=1e-14)
    assert torch.allclose(lse[:G], s.logsumexp(-1), atol=1e-14)
    assert torch.all(out[G:] == 0) and torch.all(torch.isneginf(lse[G:]))  # an empty head


def test_tier_policy_and_cache_argument_errors(tmp_path) -> None:
    for kw, msg in ((dict(host_pages=-1), "host_pages"), (dict(host_pages=0), "both 0"),
                    (dict(host_pages=1, recall=1.5), "recall"),
                    (dict(host_pages=1, disk_pages=4), "disk_dir"),
                    (dict(host_pages=1, segment_pages=0), "segment_pages")):
        with pytest.raises(ValueError, match=msg):
            TierPolicy(**kw)
    with pytest.raises(TypeError, match="prefetch"):
        TierPolicy(host_pages=1, prefetch=1)
    with pytest.raises(TypeError, match="tiers must be a TierPolicy"):
        ShardedKVCache(_cfg(), tiers={"host_pages": 1})

    class Keep:
        def demote(self, layer, seq, head, pos, k, v, score) -> None:
            pass

    pol = EvictionPolicy(scorer=KeyNorm(), budget=8, sinks=1, recent=2, action=Keep())
    with pytest.raises(ValueError, match="HardDrop"):
        ShardedKVCache(_cfg(), eviction=pol, tiers=TierPolicy(host_pages=1))
    cache = ShardedKVCache(_cfg(), tiers=TierPolicy(host_pages=1))
    with pytest.raises(ValueError, match="model_id"):
        cache.save(tmp_path, model_id="")
    cache.close()


# --------------------------------------------------------------- one rank, any device
GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _as_cuda(cache) -> None:
    """Route a CPU cache's tier store through the copy paths CUDA takes."""
    cache.tiers.store._pool.whole_slots = True
    if cache.tiers.store._files is not None:
        cache.tiers.store._files.defer = True


def _one_rank(device: str, tiers: TierPolicy, *, steps: int = 6, forced: bool = False,
              step=None):
    """A 2-layer cache on `device` (world 1) with eviction into `tiers`: prefill 32 tokens,
    compress, then `steps` decode steps, compressing after each. `step(cache, t, fn)`
    wraps each step's decode + compress (fn). Returns the outputs and the selections."""
    Q, K, V = _data(8, 32 + steps, torch.float32)
    cfg = CacheConfig(num_layers=2, q_heads=HQ, kv_heads=HKV, head_dim=D, capacity=64,
                      page_size=PS, dtype=torch.float32, device=device)
    pol = EvictionPolicy(scorer=KeyNorm(), budget=8, sinks=1, recent=2)
    cache = ShardedKVCache(cfg, eviction=pol, tiers=tiers)
    if forced:
        _as_cuda(cache)
    Q, K, V = (t.to(device) for t in (Q, K, V))
    for layer in range(2):
        cache.prefill_chunk(layer, Q[None, :32], K[None, :32], V[None, :32])
    cache.compress()
    outs, sels = [], []

    def run(t: int) -> None:
        outs.extend(_decode(cache, Q, K, V, t))
        cache.compress()

    for t in range(32, 32 + steps):
        if step is None:
            run(t)
        else:
            step(cache, t, lambda t=t: run(t))
        sels.append(dict(cache.tiers.selected))
    stats = cache.tier_stats()
    cache.close()
    return outs, sels, stats


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
@pytest.mark.parametrize("host_pages", [2, 0])
def test_prefetch_and_device_paths_give_the_same_decode(tmp_path, device, host_pages):
    """Decode over demoted pages is the same bit for bit with the next layer's pages
    prefetched or recalled on the spot, and (CPU) on the copy paths CUDA takes."""
    def tiers(prefetch: bool, sub: str) -> TierPolicy:
        return TierPolicy(host_pages=host_pages, disk_pages=64, disk_dir=str(tmp_path / sub),
                          recall=2, prefetch=prefetch)

    runs = [_one_rank(device, tiers(True, "a")), _one_rank(device, tiers(False, "b"))]
    if device == "cpu":
        runs.append(_one_rank(device, tiers(True, "c"), forced=True))
    (want, want_sel, st), *others = runs
    assert st["recalled_pages"] > 0 and st["prefetched_used"] > 0 and st["disk_pages"] > 0
    for outs, sels, _ in others:
        assert all(torch.equal(a, b) for a, b in zip(outs, want))
        assert sels == want_sel


class CopyCheck(TorchDispatchMode):
    """While active (this thread): every top-level copy_ across devices has its host end
    pinned and contiguous and is non_blocking; copies into the host tier's slots are
    issued on the tiers' side stream."""

    def __init__(self, tiers) -> None:
        super().__init__()
        self.tiers, self.checked = tiers, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.copy_.default and args[0].device != args[1].device:
            host = [t for t in args[:2] if t.device.type == "cpu"]
            nb = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
            assert nb and all(t.is_pinned() and t.is_contiguous() for t in host), \
                [(t.device, tuple(t.shape), t.stride()) for t in args[:2]]
            slots = {x.untyped_storage().data_ptr()
                     for seg in self.tiers.store._pool.segments for x in seg}
            if args[0].untyped_storage().data_ptr() in slots:
                assert torch.cuda.current_stream() == self.tiers._side
            self.checked += 1
        return func(*args, **kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("host_pages,disk_pages", [(64, 0), (2, 64), (0, 64)])
def test_cuda_tier_step_has_no_host_sync(tmp_path, monkeypatch, host_pages, disk_pages):
    """The steady-state tier work of decode steps (demoting evicted entries, flushing
    pages to host or disk, ranking, recalling, prefetching on the worker, attending the
    recalled entries) runs under set_sync_debug_mode("error"), so any implicit host
    synchronisation fails; its explicit waits are at most one per layer and step with
    every page on host (the read of the picks). Copies with host memory are pinned,
    contiguous and non_blocking; demotions copy on the side stream."""
    import ringmem.cache.decode as decode_mod
    from ringmem.cache.tiers.pages import TieredPages

    depth, waits, checks, warm = [0], [0], [], 2
    real_sync = torch.cuda.Event.synchronize

    def counted(self):
        waits[0] += depth[0] > 0
        return real_sync(self)

    monkeypatch.setattr(torch.cuda.Event, "synchronize", counted)

    def strict(fn, check):
        def run(*args, **kwargs):
            if depth[0]:  # nested: already checked
                return fn(*args, **kwargs)
            depth[0] += 1
            torch.cuda.set_sync_debug_mode("error")
            try:
                with check:
                    return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                depth[0] -= 1
        return run

    def prepare(self, layer, q, scale):
        out = TieredPages.prepare(self, layer, q, scale)
        for h in self._inflight.values():  # the worker's copies run under the mode too
            h.future.result()
        return out

    def step(cache, t, fn):
        if t == 32 + warm:  # steady state from here: check the tier work
            check = CopyCheck(cache.tiers)
            checks.append(check)
            for name, wrapped in (("prepare", prepare), ("flush", TieredPages.flush),
                                  ("add", TieredPages.add)):
                monkeypatch.setattr(cache.tiers, name, strict(wrapped.__get__(cache.tiers),
                                                              check))
            monkeypatch.setattr(decode_mod, "recall", strict(decode_mod.recall, check))
        before = waits[0]
        fn()
        if t >= 32 + warm and disk_pages == 0:
            assert waits[0] - before <= cache.config.num_layers

    _, _, st = _one_rank("cuda", TierPolicy(host_pages=host_pages, disk_pages=disk_pages,
                                            disk_dir=str(tmp_path), recall=2), step=step)
    assert st["recalled_pages"] > 0 and checks and checks[0].checked > 0
