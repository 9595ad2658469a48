"""Memory tiers: host/disk page store, page files, async transfers, summaries, checkpoints."""
from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ringmem.cache.tiers import TierPolicy, TierStore, TransferEngine, persist
from ringmem.cache.tiers.persist import PageCorruptError, load_shard, save_shard
from ringmem.cache.tiers.staging import StagingPool
from ringmem.cache.tiers.summaries import (
    PageSummaries,
    page_bounds,
    page_summary,
    rank_pages,
    select_pages,
)

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
HKV, D, PS = 2, 8, 4


def random_bits(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """Arbitrary bit patterns (NaN payloads, -0, inf, subnormals): only bytes can compare."""
    n = torch.Size(shape).numel() * dtype.itemsize
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).view(dtype).view(shape)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))


def make_store(tmp_path, dtype=torch.float32, **kw) -> TierStore:
    """A store of HKV x PS x D pages; `kw`: TierPolicy fields or store knobs."""
    dims = dict(kv_heads=HKV, head_dim=D, page_size=PS, dtype=dtype)
    dims.update((x, kw.pop(x)) for x in ("hot_device", "rank", "disk_full") if x in kw)
    pol = dict(host_pages=2, disk_pages=4, segment_pages=1, disk_dir=str(tmp_path / "tiers"))
    pol.update(kw)
    return TierStore(TierPolicy(**pol), **dims)


def make_page(i: int, n: int = PS, dtype=torch.float32, g=None):
    """k, v [Hkv, n, D] of arbitrary bits; per-head positions [Hkv, n] (head 1 is missing
    its last token, as after a per-head eviction); scores [Hkv, n] of arbitrary bits."""
    g = g or torch.Generator().manual_seed(i)
    pos = torch.stack([torch.randperm(1000, generator=g)[:n] for _ in range(HKV)])
    pos[1, -1] = -1
    return (random_bits((HKV, n, D), dtype, g), random_bits((HKV, n, D), dtype, g), pos,
            random_bits((HKV, n), torch.float32, g))


# ---------------------------------------------------------------------------- store
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_every_tier_bit_exact(tmp_path, dtype):
    store = make_store(tmp_path, dtype)
    pages = {(1, 0, i): make_page(i, PS - i % 2, dtype) for i in range(2)}  # full + partial
    keep = {key: tuple(t.clone() for t in p) for key, p in pages.items()}
    for key, p in pages.items():
        store.demote(key, *p)
        for t in p:  # the store holds a copy: the hot slot can be reused at once
            t.view(torch.uint8).fill_(0x7F)
    for tier in ("host", "disk"):
        for key, ref in keep.items():
            assert store.tier_of(key) == tier
            got = store.recall([key])[0]
            assert all(same_bytes(a, b) for a, b in zip(got, ref)), (tier, key)
        if tier == "host":
            store.spill()
    # into preallocated hot buffers, one page from disk then one from host, back to back
    store.demote((1, 0, 5), *make_page(5, 2, dtype))
    out = (torch.zeros(HKV, 9, D, dtype=dtype), torch.zeros(HKV, 9, D, dtype=dtype),
           torch.zeros(HKV, 9, dtype=torch.int64), torch.zeros(HKV, 9))
    order = [(1, 0, 1), (1, 0, 5), (1, 0, 0)]
    ns = store.recall_into(order, out)
    assert ns == [PS - 1, 2, PS] and [store.tier_of(k) for k in order] == ["disk", "host", "disk"]
    refs = [keep[order[0]], make_page(5, 2, dtype), keep[order[2]]]
    at = 0
    for n, ref in zip(ns, refs):
        assert all(same_bytes(o[:, at:at + n], r) for o, r in zip(out, ref))
        at += n
    assert all(same_bytes(o[:, at:], torch.zeros_like(o[:, at:])) for o in out)  # untouched
    with pytest.raises(ValueError, match="out holds T=9 tokens, the pages need 11"):
        store.recall_into(order + [(1, 0, 5)], out)
    with pytest.raises(ValueError, match="out must be k, v"):
        store.recall_into(order, (out[0][..., :4], *out[1:]))
    store.delete([(1, 0, 5)])
    files = sorted(p.name for p in store.dir.iterdir())
    assert files == ["L1_S0_P0.page", "L1_S0_P1.page"]
    got = store.recall([(1, 0, 1)], keep=False)[0]  # promotion: the page leaves the store
    assert all(same_bytes(a, b) for a, b in zip(got, keep[(1, 0, 1)]))
    assert store.tier_of((1, 0, 1)) is None and (1, 0, 1) not in store.summaries
    store.close()
    assert not store.dir.exists()


def test_host_spills_lru_and_capacities_hold(tmp_path):
    store = make_store(tmp_path, host_pages=3, disk_pages=5, segment_pages=2)
    ref, model = {}, OrderedDict()  # model: host keys in LRU order
    disk = set()

    def check():
        s = store.stats()
        assert s["host_pages"] <= 3 and s["disk_pages"] <= 5
        assert s["host_allocated_bytes"] <= 4 * store.page_bytes(PS)  # 2 segments
        assert store.keys("host") == list(model) and set(store.keys("disk")) == disk

    for i in range(8):
        key = (0, i % 2, i)
        ref[key] = make_page(i)
        store.demote(key, *ref[key])
        model[key] = None
        if len(model) > 3:
            disk.add(model.popitem(last=False)[0])
        if i in (3, 5):  # recalling a host page makes it most recently used
            hit = next(iter(model))
            store.recall([hit])
            model.move_to_end(hit)
        check()
    with pytest.raises(ValueError, match="tier store full: host holds 3/3 pages and disk 5/5"):
        store.demote((0, 0, 99), *make_page(99))
    check()  # nothing moved
    assert store.tier_of((0, 0, 99)) is None and (0, 0, 99) not in store.summaries
    for key, p in ref.items():  # and nothing was lost
        assert all(same_bytes(a, b) for a, b in zip(store.recall([key])[0], p))


def test_delete_only_when_told(tmp_path):
    store = make_store(tmp_path, host_pages=1, disk_pages=2)
    for i in range(3):
        store.demote((0, 0, i), *make_page(i))
    assert len(store) == 3 and store.stats()["dropped"] == 0
    path = store.dir / "L0_S0_P0.page"
    assert path.exists()
    store.delete([(0, 0, 0)])
    assert not path.exists() and store.tier_of((0, 0, 0)) is None
    assert (0, 0, 0) not in store.summaries and len(store) == 2
    with pytest.raises(KeyError, match=r"\(0, 0, 0\)"):
        store.recall([(0, 0, 0)])
    with pytest.raises(KeyError):
        store.delete([(0, 0, 0)])
    with pytest.raises(ValueError, match="already demoted or repeated"):
        store.demote((0, 0, 1), *make_page(1))


def test_demote_run_and_recall_into_over_fragmented_slots(tmp_path):
    """Batched moves (runs of consecutive slots, segment edges, holes, partial pages, more
    pages than host holds) store and return exactly the bytes given."""
    from ringmem.cache.tiers.summaries import page_summary
    store = make_store(tmp_path, torch.bfloat16, host_pages=7, disk_pages=20, segment_pages=3)
    g = torch.Generator().manual_seed(21)
    ref = {}

    def run(layer: int, m: int, n: int) -> None:
        k, v = (random_bits((HKV, n, D), torch.bfloat16, g) for _ in range(2))
        pos = torch.randperm(10 * n, generator=g)[:2 * n].view(HKV, n)
        score = random_bits((HKV, n), torch.float32, g)
        keys = [(layer, 0, i) for i in range(m)]
        store.demote_run(keys, k, v, pos, score)
        for i, key in enumerate(keys):
            ref[key] = tuple(t[:, i * PS:(i + 1) * PS].clone() for t in (k, v, pos, score))

    run(0, 5, 5 * PS - 1)  # slots 0-4 over two segments, last page partial
    store.delete([(0, 0, 1), (0, 0, 3)])
    del ref[(0, 0, 1)], ref[(0, 0, 3)]
    run(1, 3, 3 * PS)  # fills the holes 1, 3 and slot 5
    assert store.keys("host") == [(0, 0, 0), (0, 0, 2), (0, 0, 4), (1, 0, 0), (1, 0, 1),
                                  (1, 0, 2)]
    run(2, 9, 9 * PS)  # more than the host holds: host-sized groups, LRU pages spill
    s = store.stats()
    assert s["host_pages"] == 7 and s["disk_pages"] == 8 and len(store) == len(ref)
    for key, r in ref.items():
        assert all(same_bytes(a, b) for a, b in zip(store.recall([key])[0], r)), key
        mn, mx = page_summary(r[0])
        got = store.summaries.get(key)
        assert same_bytes(got[0], mn) and same_bytes(got[1], mx), key
    keys = sorted(ref)
    total = sum(r[0].shape[1] for r in ref.values())
    out = (torch.zeros(HKV, total, D, dtype=torch.bfloat16),
           torch.zeros(HKV, total, D, dtype=torch.bfloat16),
           torch.zeros(HKV, total, dtype=torch.int64), torch.zeros(HKV, total))
    ns = store.recall_into(keys, out)  # mixed host and disk stretches
    want = [torch.cat([ref[k][i] for k in keys], 1) for i in range(4)]
    assert ns == [ref[k][0].shape[1] for k in keys]
    assert all(same_bytes(a, b) for a, b in zip(out, want))
    # a partial page right before a full one in the next slot: no run may span them
    small = make_store(tmp_path / "s", torch.bfloat16, host_pages=4, segment_pages=4)
    pages = [make_page(1, PS - 1, torch.bfloat16), make_page(2, PS, torch.bfloat16)]
    for i, p in enumerate(pages):
        small.demote((0, 0, i), *p)
    both = [torch.cat([pages[0][i], pages[1][i]], 1) for i in range(4)]
    out = tuple(torch.zeros_like(t) for t in both)
    assert small.recall_into([(0, 0, 0), (0, 0, 1)], out) == [PS - 1, PS]
    assert all(same_bytes(o, t) for o, t in zip(out, both))


def test_disk_full_drops_lru_only_when_allowed(tmp_path):
    store = make_store(tmp_path, host_pages=1, disk_pages=2, disk_full="drop_lru")
    for i in range(4):
        store.demote((0, 0, i), *make_page(i))
    assert store.tier_of((0, 0, 0)) is None and store.stats()["dropped"] == 1
    assert [store.tier_of((0, 0, i)) for i in (1, 2, 3)] == ["disk", "disk", "host"]
    no_host = make_store(tmp_path / "b", host_pages=0, disk_pages=1)  # demote straight to disk
    no_host.demote((0, 0, 0), *make_page(0))
    assert no_host.tier_of((0, 0, 0)) == "disk"
    with pytest.raises(ValueError, match="disk_full='drop_lru'"):
        no_host.demote((0, 0, 1), *make_page(1))


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="host_pages must be a non-negative int, got -1"):
        make_store(tmp_path, host_pages=-1)
    with pytest.raises(ValueError, match="needs a disk_dir"):
        make_store(tmp_path, disk_dir=None)
    with pytest.raises(ValueError, match="disk_full must be one of"):
        make_store(tmp_path, disk_full="delete")
    store = make_store(tmp_path)
    k, v, p, _ = make_page(0)
    with pytest.raises(ValueError, match="k/v dtype is torch.float64"):
        store.demote((0, 0, 0), k.double(), v, p)
    with pytest.raises(ValueError, match=r"1 <= n <= 4 \(1 page\(s\) of 4\), got \(2, 5, 8\)"):
        store.demote((0, 0, 0), torch.zeros(HKV, 5, D), torch.zeros(HKV, 5, D), torch.arange(5))
    with pytest.raises(ValueError, match="pos must be int64"):
        store.demote((0, 0, 0), k, v, p.int())
    with pytest.raises(ValueError, match="score must be float32"):
        store.demote((0, 0, 0), k, v, p, torch.zeros(HKV, PS, dtype=torch.float64))
    with pytest.raises(ValueError, match="page key must be"):
        store.demote((0, -1, 0), k, v, p)


def test_shared_positions_and_default_scores(tmp_path):
    store = make_store(tmp_path, host_pages=1)
    k, v, _, _ = make_page(0)
    store.demote((0, 0, 0), k, v, torch.arange(PS))  # [n]: every head holds these tokens
    store.demote((0, 0, 1), k, v, torch.arange(PS) + PS)  # spills page 0
    page = store.recall([(0, 0, 0)])[0]
    assert torch.equal(page.pos, torch.arange(PS).expand(HKV, PS))
    assert torch.equal(page.score, torch.zeros(HKV, PS))
    assert store.stats()["host_to_disk_bytes"] == HKV * PS * (2 * D * 4 + 12)


# ---------------------------------------------------------------------------- integrity
def _spilled(tmp_path):
    store = make_store(tmp_path, torch.bfloat16)
    ref = make_page(7, PS, torch.bfloat16)
    store.demote((0, 0, 7), *ref)
    store.spill()
    return store, store.dir / "L0_S0_P7.page", ref


@pytest.mark.parametrize("where", [0, 12, 30, -200, -100, -1])  # magic, crc, header, payload
def test_corrupted_byte_detected(tmp_path, where):
    store, path, _ = _spilled(tmp_path)
    data = bytearray(path.read_bytes())
    data[where] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(PageCorruptError, match=f"{path}.*(corrupt|magic)"):
        store.recall([(0, 0, 7)])


@pytest.mark.parametrize("keep", [0, 10, 40, 0.5, -1])
def test_truncated_file_detected(tmp_path, keep):
    store, path, _ = _spilled(tmp_path)
    data = path.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    path.write_bytes(data[:cut])
    with pytest.raises(PageCorruptError, match=f"{path}.*truncated"):
        store.recall([(0, 0, 7)])


def test_swapped_or_missing_file_detected(tmp_path):
    store, path, ref = _spilled(tmp_path)
    store.demote((0, 0, 8), *make_page(8, PS, torch.bfloat16))
    store.spill()
    other = store.dir / "L0_S0_P8.page"
    good = path.read_bytes()
    path.write_bytes(other.read_bytes())  # a valid page file under the wrong name
    with pytest.raises(PageCorruptError, match="does not hold page"):
        store.recall([(0, 0, 7)])
    path.write_bytes(good)
    assert all(same_bytes(a, b) for a, b in zip(store.recall([(0, 0, 7)])[0], ref))
    other.unlink()
    with pytest.raises(PageCorruptError, match="missing"):
        store.recall([(0, 0, 8)])


# ---------------------------------------------------------------------------- transfers
def test_async_prefetch_and_demote_bit_exact(tmp_path):
    store = make_store(tmp_path, torch.float16, host_pages=2, disk_pages=4)
    ref = {(2, 0, i): make_page(i, PS, torch.float16) for i in range(6)}  # fills both tiers
    with TransferEngine(store) as eng:
        hs = [eng.demote(key, *p) for key, p in ref.items()]
        assert len(store.summaries) == 6  # summaries are visible before the moves finish
        pre = eng.prefetch(list(ref))  # queued behind the demotions
        assert all(eng.wait(h) is None for h in hs)
        got = eng.wait(pre)
        assert [store.tier_of(k) for k in ref] == ["disk"] * 4 + ["host"] * 2
        for page, p in zip(got, ref.values()):
            assert all(same_bytes(a, b) for a, b in zip(page, p))
        out = tuple(torch.cat([p[i] for p in ref.values()], 1) for i in range(4))
        buf = tuple(torch.zeros_like(t) for t in out)
        assert eng.wait(eng.prefetch(list(ref), buf)) == [PS] * 6  # into preallocated buffers
        assert all(same_bytes(a, b) for a, b in zip(buf, out))
        path = store.dir / "L2_S0_P0.page"
        data = bytearray(path.read_bytes())
        data[-1] ^= 1
        path.write_bytes(bytes(data))
        with pytest.raises(PageCorruptError, match="L2_S0_P0.page"):
            eng.wait(eng.prefetch([(2, 0, 0)]))  # the worker's error reaches the caller
        bad = eng.demote((2, 0, 9), *make_page(9, PS, torch.float16))
        with pytest.raises(ValueError, match="tier store full"):
            eng.wait(bad)
        assert (2, 0, 9) not in store.summaries  # the failed demotion left no summary


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_side_stream_round_trip(tmp_path):
    store = make_store(tmp_path, torch.bfloat16, hot_device="cuda", host_pages=2, disk_pages=4)
    ref = {(0, 0, i): make_page(i, PS, torch.bfloat16) for i in range(4)}
    with TransferEngine(store) as eng:
        hs = [eng.demote(key, *(t.cuda() for t in p)) for key, p in ref.items()]
        for h in hs:
            eng.wait(h)
        got = eng.wait(eng.prefetch(list(ref)))
        for page, p in zip(got, ref.values()):
            assert all(t.is_cuda for t in page)
            assert all(same_bytes(a.cpu(), b) for a, b in zip(page, p))


# ---------------------------------------------------------------------------- summaries
def brute_bounds(q, keys, groups, scale):
    """Per page and KV head: max over the group's query heads of sum_c max(q_c mn_c, q_c mx_c),
    channel by channel, from the keys themselves."""
    out = torch.empty(len(keys), keys[0].shape[0], dtype=torch.float64)
    for p, k in enumerate(keys):
        mn, mx = k.min(1).values, k.max(1).values
        for h in range(k.shape[0]):
            out[p, h] = max(sum(max(q[i, c] * mn[h, c], q[i, c] * mx[h, c])
                                for c in range(k.shape[2]))
                            for i in range(h * groups, (h + 1) * groups)) * scale
    return out


@pytest.mark.parametrize("groups", [1, 4])
def test_bound_is_an_upper_bound(groups):
    g = torch.Generator().manual_seed(groups)
    keys = [torch.randn(HKV, n, D, dtype=torch.float64, generator=g) * 3 for n in (1, 3, 16, 64)]
    q = torch.randn(HKV * groups, D, dtype=torch.float64, generator=g)
    kmin = torch.stack([k.min(1).values for k in keys])
    kmax = torch.stack([k.max(1).values for k in keys])
    b = page_bounds(q, kmin, kmax, groups, scale=0.5)
    torch.testing.assert_close(b, brute_bounds(q, keys, groups, 0.5), rtol=1e-12, atol=1e-12)
    for p, k in enumerate(keys):
        qg = q.reshape(HKV, groups, D)
        true = torch.einsum("hgd,hnd->hgn", qg, k).amax((1, 2)) * 0.5
        assert (b[p] >= true - 1e-12).all()
        if k.shape[1] == 1:  # one key: min = max, the bound is the logit itself
            torch.testing.assert_close(b[p], true, rtol=1e-12, atol=1e-12)
    # hand example: q = (1, -2), keys (0, 1), (2, -1): bound 1*2 + (-2)*(-1) = 4 = true max
    k = torch.tensor([[[0.0, 1.0], [2.0, -1.0]]], dtype=torch.float64)
    q1 = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    assert page_bounds(q1, k.amin(1)[None], k.amax(1)[None]).item() == 4.0


def test_select_pages_matches_brute_force_ranking():
    g = torch.Generator().manual_seed(3)
    for _trial in range(20):
        p = int(torch.randint(1, 40, (1,), generator=g))
        b = torch.randint(-3, 4, (p, HKV), generator=g).double()  # many ties
        ids = torch.randperm(1000, generator=g)[:p]
        n = int(torch.randint(0, p + 3, (1,), generator=g))
        score = b.max(1).values.tolist()
        want = sorted(range(p), key=lambda r: (-score[r], int(ids[r])))[:n]
        assert select_pages(b, n, ids).tolist() == want
        want_rows = sorted(range(p), key=lambda r: (-score[r], r))[:n]
        assert select_pages(b, n).tolist() == want_rows
    with pytest.raises(ValueError, match="NaN"):
        select_pages(torch.tensor([1.0, float("nan")]), 1)
    with pytest.raises(ValueError, match="n must be a non-negative int, got -1"):
        select_pages(torch.zeros(3), -1)


def test_store_recalls_the_pages_the_bound_ranks_highest(tmp_path):
    store = make_store(tmp_path, torch.float64, host_pages=4, disk_pages=9)
    g = torch.Generator().manual_seed(5)
    keys = {}
    for i in range(12):  # integer keys: exact bounds and real ties
        k = torch.randint(-4, 5, (HKV, PS, D), generator=g).double()
        keys[(0, 0, i)] = k
        store.demote((0, 0, i), k, k.clone(), torch.arange(PS) + PS * i)
    store.demote((0, 1, 0), *make_page(0, PS, torch.float64))  # another sequence: never picked
    store.delete([(0, 0, 3), (0, 0, 7)])
    del keys[(0, 0, 3)], keys[(0, 0, 7)]
    q = torch.randint(-2, 3, (2 * HKV, D), generator=g).double()
    score = brute_bounds(q, list(keys.values()), 2, 1.0).max(1).values.tolist()
    ranked = [key for _, key in sorted(zip(score, keys), key=lambda x: (-x[0], x[1][2]))]
    assert store.summaries.top_pages(0, 0, q, 5) == ranked[:5]
    pages = store.recall(ranked[:5])
    for key, page in zip(ranked[:5], pages):
        assert same_bytes(page.k, keys[key])
    assert PageSummaries(HKV, D).top_pages(0, 0, q, 3) == []


def test_bound_skips_empty_slots_and_heads():
    g = torch.Generator().manual_seed(9)
    k = torch.randn(HKV, PS, D, dtype=torch.float64, generator=g)
    valid = torch.tensor([[True, False, True, False], [False] * 4])  # head 1 holds nothing
    k[0, 1] = 1e6  # garbage in an empty slot must not loosen the bound
    summ = PageSummaries(HKV, D, dtype=torch.float64)
    summ.add((0, 0, 0), k, valid)
    q = torch.randn(HKV, D, dtype=torch.float64, generator=g)
    _, b = summ.bounds(0, 0, q)
    want = brute_bounds(q[:1], [k[:1, valid[0]]], 1, 1.0)[0, 0]
    torch.testing.assert_close(b[0, 0], want, rtol=1e-12, atol=1e-12)
    assert b[0, 1] == float("-inf")


# ---------------------------------------------------------------------------- checkpoints
def shard_state(dtype=torch.float32, world=2, rank=1, seed=0):
    """A PagedStore-shaped state: 2 layers, 2 sequences, pages handed out out of order,
    per-head positions (heads of layer 1 hold different tokens, as after an eviction)."""
    g = torch.Generator().manual_seed(seed)
    slots = 6 * PS
    tables = [[[4, 1], [0, 2, 5]], [[0, 1], [2, 3, 4]]]
    hlens = [[[7, 7], [9, 9]], [[7, 5], [9, 12]]]
    seen = [[14, 30], [14, 30]]
    layers = []
    for layer in range(2):
        pos = torch.full((HKV, slots), -1, dtype=torch.int64)
        for s, table in enumerate(tables[layer]):
            idx = (torch.tensor(table)[:, None] * PS + torch.arange(PS)).flatten()
            for h, n in enumerate(hlens[layer][s]):
                pos[h, idx[:n]] = torch.randperm(seen[layer][s], generator=g)[:n]
        layers.append({"k": random_bits((HKV, slots, D), dtype, g),
                       "v": random_bits((HKV, slots, D), dtype, g), "pos": pos,
                       "score": torch.rand(HKV, slots, generator=g)})
    meta = {"model_id": "org/model@rev1", "layout": "stripe", "world_size": world,
            "rank": rank, "dtype": dtype, "num_layers": 2, "kv_heads": HKV, "head_dim": D,
            "page_size": PS, "tables": tables, "hlens": hlens, "seen": seen,
            "state": {"free": [[3], [5]], "counts": [[[7, 7], [9, 9]], [[7, 7], [9, 12]]]}}
    return meta, layers


def expect_of(meta, **over):
    e = {k: meta[k] for k in ("model_id", "layout", "world_size", "rank", "dtype")}
    return {**e, **over}


@pytest.mark.parametrize("dtype", DTYPES)
def test_checkpoint_round_trip_bit_exact(tmp_path, dtype):
    meta, layers = shard_state(dtype)
    save_shard(tmp_path, meta, layers)
    shard = load_shard(tmp_path, expect_of(meta, next_positions=[14, 30], page_size=PS))
    for got, ref in zip(shard.layers, layers):
        assert set(got) == set(ref)
        assert all(same_bytes(got[n], ref[n]) for n in ref)
    for f in ("model_id", "tables", "hlens", "seen", "state", "page_size"):
        assert shard.meta[f] == meta[f]
    assert shard.meta["dtype"] == dtype


@pytest.mark.parametrize("field,value,msg", [
    ("model_id", "org/other", "model_id is 'org/model@rev1', expected 'org/other'"),
    ("layout", "zigzag", "layout is 'stripe', expected 'zigzag'"),
    ("world_size", 4, "world_size is 2, expected 4"),
    ("dtype", torch.bfloat16, "dtype is 'float32', expected 'bfloat16'"),
    ("next_positions", [14, 18], r"positions do not match: layer 0 holds next_positions "
                                 r"\[14, 30\]"),
    ("head_dim", 16, "head_dim is 8, expected 16"),
])
def test_checkpoint_validation_names_the_field(tmp_path, field, value, msg):
    meta, layers = shard_state()
    save_shard(tmp_path, meta, layers)
    with pytest.raises(ValueError, match=msg):
        load_shard(tmp_path, expect_of(meta, **{field: value}))


def _with_pos(layers, layer, fn):
    out = [dict(x) for x in layers]
    out[layer]["pos"] = out[layer]["pos"].clone()
    fn(out[layer]["pos"])
    return out


def test_checkpoint_damage_and_bad_input(tmp_path):
    meta, layers = shard_state()
    # layer 0 seq 1 holds pages 0, 2, 5: its head 0's first two tokens sit in slots 0, 1
    bad = _with_pos(layers, 0, lambda p: p[0].__setitem__(1, p[0, 0]))
    with pytest.raises(ValueError, match="layer 0 seq 1 head 0 repeat a token"):
        save_shard(tmp_path / "x", meta, bad)
    bad = _with_pos(layers, 1, lambda p: p[1].__setitem__(0, 14))  # seq 0 has seen 14
    with pytest.raises(ValueError, match=r"layer 1 seq 0 head 1 must lie in \[0, 14\)"):
        save_shard(tmp_path / "y", meta, bad)
    with pytest.raises(ValueError, match="page table .* does not fit"):
        save_shard(tmp_path / "z", {**meta, "hlens": [[[7, 7], [9, 13]], meta["hlens"][1]]},
                   layers)
    with pytest.raises(ValueError, match="meta is missing 'seen'"):
        save_shard(tmp_path / "w", {k: v for k, v in meta.items() if k != "seen"}, layers)
    path = save_shard(tmp_path, meta, layers)
    with pytest.raises(ValueError, match="missing \\['dtype'\\]"):
        load_shard(tmp_path, {k: v for k, v in expect_of(meta).items() if k != "dtype"})
    with pytest.raises(FileNotFoundError, match="rank 0"):
        load_shard(tmp_path, expect_of(meta, rank=0))
    man = json.loads(path.read_text())
    rec = tmp_path / "rank00001" / man["files"][1]["name"]
    data = bytearray(rec.read_bytes())
    data[len(data) // 2] ^= 4
    rec.write_bytes(bytes(data))
    with pytest.raises(PageCorruptError, match=f"{rec}.*CRC-32"):
        load_shard(tmp_path, expect_of(meta))
    man["seen"][0][0] += 1  # tampered manifest
    path.write_text(json.dumps(man))
    with pytest.raises(PageCorruptError, match="manifest .* CRC-32 mismatch"):
        load_shard(tmp_path, expect_of(meta))


def test_checkpoint_positions_cross_checked(tmp_path):
    meta, layers = shard_state()
    path = save_shard(tmp_path, meta, layers)
    man = json.loads(path.read_text())
    man.pop("crc32")
    man["positions"][1][0]["crc32"] ^= 1  # a consistent-looking but wrong manifest
    man["crc32"] = persist._manifest_crc(man)
    path.write_text(json.dumps(man))
    with pytest.raises(PageCorruptError, match="positions of layer 1 seq 0"):
        load_shard(tmp_path, expect_of(meta))


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    meta, layers = shard_state(seed=1)
    save_shard(tmp_path, meta, layers)
    meta2, layers2 = shard_state(seed=2)
    real, calls = persist.write_record, []

    def failing(*a, **kw):  # the disk fills up on the second layer
        calls.append(1)
        if len(calls) == 2:
            raise OSError("No space left on device")
        return real(*a, **kw)

    monkeypatch.setattr(persist, "write_record", failing)
    with pytest.raises(OSError):
        save_shard(tmp_path, meta2, layers2)
    monkeypatch.setattr(persist, "write_record", real)
    shard = load_shard(tmp_path, expect_of(meta))  # the first checkpoint, whole
    assert same_bytes(shard.layers[1]["k"], layers[1]["k"])
    save_shard(tmp_path, meta2, layers2)  # a new save replaces it and sweeps leftovers
    shard = load_shard(tmp_path, expect_of(meta2))
    assert same_bytes(shard.layers[1]["k"], layers2[1]["k"])
    assert len(list((tmp_path / "rank00001").iterdir())) == 1


# ------------------------------------------------------- resume a cache (world 1)
def test_save_load_decode_equals_uninterrupted_decode(tmp_path):
    """ShardedKVCache.save / load over these records (more, with tiers and several ranks,
    in test_tiered_cache.py)."""
    from ringmem.cache import CacheConfig, ShardedKVCache
    cfg = CacheConfig(num_layers=2, q_heads=4, kv_heads=2, head_dim=8, capacity=64,
                      page_size=4, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(11)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(cfg.dtype)

    steps = [[(rnd(1, 1, 4, 8), rnd(1, 1, 2, 8), rnd(1, 1, 2, 8)) for _ in range(2)]
             for _ in range(5)]
    a = ShardedKVCache(cfg)
    for layer in range(2):
        a.prefill_chunk(layer, rnd(1, 13, 4, 8), rnd(1, 13, 2, 8), rnd(1, 13, 2, 8))
    for step in steps[:2]:
        for layer, qkv in enumerate(step):
            a.decode(layer, *qkv)
    a.save(tmp_path, model_id="test/model")
    want = [[a.decode(layer, *qkv) for layer, qkv in enumerate(step)] for step in steps[2:]]
    b = ShardedKVCache.load(tmp_path, cfg, model_id="test/model")
    assert b.next_position() == 15
    got = [[b.decode(layer, *qkv) for layer, qkv in enumerate(step)] for step in steps[2:]]
    assert all(torch.equal(x, y) for gs, ws in zip(got, want) for x, y in zip(gs, ws))


# ------------------------------------------------- asynchronous copies (CUDA paths)
# "cpu-as-cuda": a CPU store forced onto the paths CUDA takes (whole-slot copies with a
# contiguous host end, device pages written to disk through staging, later), so what can
# be checked without a GPU is; "cuda" runs them for real where a GPU is present.
ON_DEVICE = [pytest.param("cpu", False, id="cpu"),
             pytest.param("cpu", True, id="cpu-as-cuda"),
             pytest.param("cuda", False, id="cuda", marks=[
                 pytest.mark.gpu,
                 pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])]


def as_cuda(store: TierStore) -> TierStore:
    """Route a CPU store through the copy paths CUDA takes."""
    store._pool.whole_slots = True
    if store._files is not None:
        store._files.defer = True
    return store


class CopyLog(TorchDispatchMode):
    """Every top-level `copy_`: its two ends (storage, device, contiguous, pinned), the
    non_blocking flag and the stream current when it was issued (CUDA)."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[dict] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.copy_.default:
            ends = [{"ptr": t.untyped_storage().data_ptr(), "device": t.device.type,
                     "contiguous": t.is_contiguous(),
                     "pinned": t.device.type == "cpu" and t.is_pinned()} for t in args[:2]]
            cuda = any(e["device"] == "cuda" for e in ends)
            self.copies.append({"dst": ends[0], "src": ends[1],
                                "non_blocking": bool(args[2] if len(args) > 2
                                                     else kwargs.get("non_blocking", False)),
                                "stream": torch.cuda.current_stream() if cuda else None})
        return func(*args, **kwargs)


def host_buffers(store: TierStore) -> set[int]:
    """Storages of the store's host memory: slot segments and staging buffers."""
    ptrs = {t.untyped_storage().data_ptr() for seg in store._pool.segments for t in seg}
    if store._files is not None:
        ptrs |= {b.untyped_storage().data_ptr() for b, _ in store._files.staging._free}
    return ptrs


def check_async_copies(log: CopyLog, host: set[int]) -> int:
    """Every copy with a host buffer (or, on CUDA, across devices): host end contiguous
    (one DMA, no pageable temporary), pinned on CUDA, non_blocking. Returns how many."""
    n = 0
    for c in log.copies:
        ends = [e for e in (c["dst"], c["src"]) if e["ptr"] in host]
        cross = c["dst"]["device"] != c["src"]["device"]
        if cross:
            ends = [e for e in (c["dst"], c["src"]) if e["device"] == "cpu"]
        if not ends:
            continue
        n += 1
        assert c["non_blocking"], c
        assert all(e["contiguous"] for e in ends), c
        assert not cross or all(e["pinned"] for e in ends), c
    return n


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.cpu().contiguous().view(torch.uint8)


@pytest.mark.parametrize("device,forced", ON_DEVICE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_pages_round_trip_bit_exact(tmp_path, device, forced, dtype):
    """Pages demoted from `device` come back bit-exactly from host and disk: runs over
    fragmented slots and segment edges, partial pages, LRU spills, demotion straight to
    disk; every copy with host memory is contiguous there and non_blocking."""
    mk = dict(hot_device=device, dtype=dtype, disk_pages=20)
    stores = [make_store(tmp_path / "a", host_pages=5, segment_pages=3, **mk),
              make_store(tmp_path / "b", host_pages=0, **mk)]  # straight to disk
    if forced:
        stores = [as_cuda(s) for s in stores]
    staged = forced or device == "cuda"
    g = torch.Generator().manual_seed(3)
    refs: list[dict] = [{}, {}]
    log = CopyLog()

    def run(i: int, layer: int, m: int, n: int) -> None:
        k, v = (random_bits((HKV, n, D), dtype, g) for _ in range(2))
        pos = torch.randperm(10 * n, generator=g)[:2 * n].view(HKV, n)
        score = random_bits((HKV, n), torch.float32, g)
        keys = [(layer, 0, j) for j in range(m)]
        hot = [t.to(device, copy=True) for t in (k, v, pos, score)]
        with log:
            stores[i].demote_run(keys, *hot)
        for t in hot:  # the store copied: the hot memory may be reused at once
            t.view(torch.uint8).fill_(0x7F)
        for j, key in enumerate(keys):
            refs[i][key] = tuple(t[:, j * PS:(j + 1) * PS].clone() for t in (k, v, pos, score))

    run(0, 0, 5, 5 * PS - 1)  # slots 0-4 over two segments, the last page partial
    stores[0].delete([(0, 0, 1), (0, 0, 3)])
    del refs[0][(0, 0, 1)], refs[0][(0, 0, 3)]
    run(0, 1, 3, 3 * PS)  # fills the holes 1, 3 and slot 5
    run(0, 2, 4, 4 * PS - 2)  # host full: LRU pages spill to disk
    run(1, 0, 3, 3 * PS - 2)
    # device pages bound for disk wait in staging; the next demotion writes those whose
    # copies have landed, and a page dropped while still staged never reaches the disk
    files = stores[1]._files
    assert all(files.path(k).exists() != staged for k in refs[1])
    if device == "cuda":
        torch.cuda.synchronize()
    stores[1].demote((5, 0, 0), *(t.to(device) for t in make_page(5, PS, dtype)))
    assert all(files.path(k).exists() for k in refs[1])
    assert files.path((5, 0, 0)).exists() != staged and len(files._pending) == staged
    stores[1].delete([(5, 0, 0)])
    assert not files.path((5, 0, 0)).exists() and not files._pending
    assert {stores[0].tier_of(k) for k in refs[0]} == {"host", "disk"}
    for store, ref in zip(stores, refs):
        with log:
            for key, r in ref.items():
                got = store.recall([key])[0]
                assert all(x.device.type == device for x in got)
                assert all(torch.equal(bits(a), bits(b)) for a, b in zip(got, r)), key
            keys = sorted(ref, reverse=True)  # host and disk stretches, out of slot order
            total = sum(ref[k][0].shape[1] for k in keys)
            out = (torch.zeros(HKV, total, D, dtype=dtype, device=device),
                   torch.zeros(HKV, total, D, dtype=dtype, device=device),
                   torch.zeros(HKV, total, dtype=torch.int64, device=device),
                   torch.zeros(HKV, total, device=device))
            assert store.recall_into(keys, out) == [ref[k][0].shape[1] for k in keys]
        want = [torch.cat([ref[k][i] for k in keys], 1) for i in range(4)]
        assert all(torch.equal(bits(a), bits(b)) for a, b in zip(out, want))
        assert all(store._files.path(k).exists() for k in ref if store.tier_of(k) == "disk")
    if staged:
        assert check_async_copies(log, host_buffers(stores[0]) | host_buffers(stores[1])) > 0
    for store in stores:
        store.close()
        assert not store.dir.exists()


@pytest.mark.parametrize("device,forced", ON_DEVICE)
def test_staging_buffers_are_contiguous_and_reused(tmp_path, device, forced):
    store = make_store(tmp_path, hot_device=device, host_pages=1, disk_pages=8)
    if forced:
        as_cuda(store)
    ref = {(0, 0, i): make_page(i, PS - i % 2) for i in range(5)}
    for key, p in ref.items():
        store.demote(key, *(t.to(device) for t in p))
    keys = list(ref)[:4]
    assert [store.tier_of(k) for k in keys] == ["disk"] * 4
    total = sum(ref[k][0].shape[1] for k in keys)
    out = (torch.zeros(HKV, total, D, device=device), torch.zeros(HKV, total, D, device=device),
           torch.zeros(HKV, total, dtype=torch.int64, device=device),
           torch.zeros(HKV, total, device=device))
    pool = store._files.staging
    store.recall_into(keys, out)
    made, seen = pool.allocations, set()
    for _ in range(3):  # steady state: the same buffers, none allocated
        if device == "cuda":  # the copies out of them are done: all reusable
            torch.cuda.synchronize()
        store.recall_into(keys, out)
        seen |= {b.data_ptr() for b, _ in pool._free}
        assert pool.allocations == made
    assert 1 <= len(seen) <= pool.keep and made <= pool.keep
    assert all(b.is_contiguous() and b.is_pinned() == store.pin for b, _ in pool._free)
    assert store.pin == torch.cuda.is_available()
    want = [torch.cat([ref[k][i] for k in keys], 1) for i in range(4)]
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(out, want))
    store.close()


def test_staging_pool_reuses_buffers_after_their_copies():
    pool = StagingPool(100, pin=False, keep=2)
    a = pool.take()
    assert a.numel() == 100 and a.dtype == torch.uint8 and a.is_contiguous()
    pool.give(a, None)
    assert pool.take().data_ptr() == a.data_ptr() and pool.allocations == 1
    b = pool.take()  # `a` is out: a second buffer
    pool.give(a, None)
    pool.give(b, None)
    pool.give(pool.take(), None)
    assert pool.allocations == 2 and len(pool._free) == 2
    pool.give(torch.empty(100, dtype=torch.uint8), None)  # more than `keep`: not kept
    assert len(pool._free) == 2
    with pytest.raises(ValueError, match="nbytes must be a positive int, got 0"):
        StagingPool(0, pin=False)


@pytest.mark.parametrize("device,forced", ON_DEVICE)
def test_prefetch_equals_synchronous_recall(tmp_path, device, forced):
    """The worker's recalls (new tensors, or into buffers) hold exactly what a recall on
    the caller's thread gives, from both tiers."""
    store = make_store(tmp_path, torch.bfloat16, hot_device=device, host_pages=3,
                       disk_pages=8, segment_pages=2)
    if forced:
        as_cuda(store)
    pages = {(1, 0, i): make_page(i, PS - (i == 4), torch.bfloat16) for i in range(7)}
    with TransferEngine(store) as eng:
        for h in [eng.demote(key, *(t.to(device) for t in p)) for key, p in pages.items()]:
            eng.wait(h)
        keys = [(1, 0, i) for i in (6, 0, 4, 5, 1)]  # host and disk, out of order
        assert {store.tier_of(k) for k in keys} == {"host", "disk"}
        pre = eng.wait(eng.prefetch(keys))
        sync = store.recall(keys)
        for a, b, key in zip(pre, sync, keys):
            assert all(x.device.type == device for x in a)
            assert all(torch.equal(bits(x), bits(y)) for x, y in zip(a, b))
            assert all(torch.equal(bits(x), bits(y)) for x, y in zip(a, pages[key]))
        total = sum(p.k.shape[1] for p in sync)
        bufs = [tuple(torch.zeros(HKV, total, *tail, dtype=dt, device=device) for dt, tail in
                      ((torch.bfloat16, (D,)), (torch.bfloat16, (D,)), (torch.int64, ()),
                       (torch.float32, ()))) for _ in range(2)]
        ns = eng.wait(eng.prefetch(keys, bufs[0]))
        assert ns == store.recall_into(keys, bufs[1])
        assert all(torch.equal(bits(x), bits(y)) for x, y in zip(*bufs))
    store.close()


def test_device_ranking_matches_select_pages_and_flags_nan():
    g = torch.Generator().manual_seed(4)
    for _trial in range(10):
        p = int(torch.randint(1, 30, (1,), generator=g))
        b = torch.randint(-3, 4, (p, HKV), generator=g).double()  # many ties
        ids = torch.randperm(1000, generator=g)[:p]
        n = int(torch.randint(0, p + 3, (1,), generator=g))
        rows, nan = rank_pages(b, n, ids)
        assert torch.equal(rows, select_pages(b, n, ids)) and not bool(nan)
    rows, nan = rank_pages(torch.tensor([1.0, float("nan")]), 1)
    assert bool(nan) and rows.shape == (1,)
    summ = PageSummaries(HKV, D)
    keys = torch.randn(6, HKV, PS, D, generator=g)
    for i in (3, 0, 5, 1):
        summ.add((0, 0, i), keys[i])
    summ.remove((0, 0, 0))  # rows move: the snapshot of ids maps them back
    q = torch.randn(2 * HKV, D, generator=g)
    picks = summ.select(0, 0, q, 2, scale=0.5)
    assert [(0, 0, picks.ids[r]) for r in picks.rows.tolist()] == summ.top_pages(0, 0, q, 2,
                                                                                scale=0.5)
    assert summ.select(0, 1, q, 2) is None
    with pytest.raises(ValueError, match="NaN"):
        summ.top_pages(0, 0, torch.full((2 * HKV, D), float("nan")), 2)


def test_masked_summary_is_the_where_reference():
    g = torch.Generator().manual_seed(8)
    k = torch.randn(HKV, PS, D, generator=g).to(torch.bfloat16)
    valid = torch.tensor([[True, False, True, True], [False] * PS])
    mn, mx = page_summary(k, valid)
    x, m = k.float(), valid.unsqueeze(-1)
    inf = torch.tensor(float("inf"))
    assert torch.equal(mn, x.where(m, inf).amin(1)) and torch.equal(mx, x.where(m, -inf).amax(1))
