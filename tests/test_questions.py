"""Many questions about one document: sequences forked from a prefilled document share its
pages (held once per rank) and answer exactly as independent runs do."""
from __future__ import annotations

import pytest
import torch

from ringmem.cache import CacheConfig, ShardedKVCache
from ringmem.reference import reference_attention
from ringmem.testing import spawn

HQ, HKV, D, PS = 4, 2, 16, 4
DOC, QLENS, STEPS, CHUNK = 45, (3, 6, 1), 3, 8


def _cfg(seqs: int, windows: tuple[int, ...]) -> CacheConfig:
    return CacheConfig(num_layers=2, q_heads=HQ, kv_heads=HKV, head_dim=D, capacity=128,
                       page_size=PS, max_seqs=seqs, dtype=torch.float64, windows=windows)


def _tokens(seed: int, n: int, b: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, h, D, generator=g, dtype=torch.float64) for h in (HQ, HKV, HKV)]


def _prefill(cache: ShardedKVCache, layer: int, seq: int, qkv: list[torch.Tensor]) -> list:
    """Chunked prefill of qkv into `seq`; the outputs of this rank's real rows."""
    outs, n = [], qkv[0].shape[1]
    for c0 in range(0, n, CHUNK):
        m = min(CHUNK, n - c0)
        pad = -(-m // cache.world) * cache.world
        parts = [cache.shard_chunk(torch.cat([t[:, c0:c0 + m],
                                              t.new_zeros(1, pad - m, *t.shape[2:])], 1))
                 for t in qkv]
        outs.append(cache.prefill_chunk(layer, *parts, seq=seq, n_valid=m))
    return outs


def _steps(seqs: list[int]) -> list[list[list[torch.Tensor]]]:
    """[step][layer] q/k/v [len(seqs), 1, H, D]: row i is sequence seqs[i]'s token."""
    return [[[torch.cat([_tokens(1000 * s + 10 * t + lay, 1)[j] for s in seqs])
              for j in range(3)] for lay in range(2)] for t in range(STEPS)]


def _shared(rank: int, world: int, windows: tuple[int, ...]) -> None:
    n = len(QLENS)
    cache = ShardedKVCache(_cfg(n, windows))
    doc = [_tokens(7 + lay, DOC) for lay in range(2)]
    for lay in range(2):
        _prefill(cache, lay, 0, doc[lay])
    cache.fork(0, list(range(1, n)))
    got = {s: [_prefill(cache, lay, s, _tokens(100 + 10 * s + lay, QLENS[s]))
               for lay in range(2)] for s in range(n)}
    dec = [[cache.decode(lay, *qkv) for lay, qkv in enumerate(step)]
           for step in _steps(list(range(n)))]
    pages = cache.pages_in_use()
    for s in range(n):  # each question alone, in a cache of its own
        one = ShardedKVCache(_cfg(1, windows))
        for lay in range(2):
            _prefill(one, lay, 0, doc[lay])
        want = [_prefill(one, lay, 0, _tokens(100 + 10 * s + lay, QLENS[s])) for lay in range(2)]
        for lay in range(2):
            for g, w in zip(got[s][lay], want[lay]):
                assert torch.allclose(g, w, rtol=0, atol=1e-12), (s, lay)
        for t, step in enumerate(_steps([s])):
            for lay, qkv in enumerate(step):
                w = one.decode(lay, *qkv)
                assert torch.allclose(dec[t][lay][s], w[0], rtol=0, atol=1e-12), (s, t, lay)
    # the document's full pages of a global layer are held once: each fork adds only its
    # own pages (the copied partial page, its question and answer)
    indep = []
    for s in range(n):
        one = ShardedKVCache(_cfg(1, windows))
        for lay in range(2):
            _prefill(one, lay, 0, doc[lay])
        shared_full = one.stores[0].lens[0] // PS  # the document's full pages on this rank
        for lay in range(2):
            _prefill(one, lay, 0, _tokens(100 + 10 * s + lay, QLENS[s]))
        for step in _steps([s]):
            for lay, qkv in enumerate(step):
                one.decode(lay, *qkv)
        indep.append((one.stores[0].pages_in_use, shared_full))
    want0 = indep[0][0] + sum(p - full for p, full in indep[1:])
    assert pages[0] == want0, (rank, pages, indep)
    assert pages[0] < sum(p for p, _ in indep) or indep[0][1] == 0
    # against float64 full attention: the global layer's last decode step of each sequence
    for s in range(n):
        q = torch.cat([doc[0][0], _tokens(100 + 10 * s, QLENS[s])[0],
                       *[st[0][0][s:s + 1] for st in _steps(list(range(n)))]], 1)
        k = torch.cat([doc[0][1], _tokens(100 + 10 * s, QLENS[s])[1],
                       *[st[0][1][s:s + 1] for st in _steps(list(range(n)))]], 1)
        v = torch.cat([doc[0][2], _tokens(100 + 10 * s, QLENS[s])[2],
                       *[st[0][2][s:s + 1] for st in _steps(list(range(n)))]], 1)
        ref, _ = reference_attention(q, k, v, causal=True)
        assert torch.allclose(dec[-1][0][s, 0], ref[0, -1], rtol=0, atol=1e-12), s


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("windows", [(), (-1, 6)])
def test_forked_questions_equal_independent_runs(world: int, windows: tuple) -> None:
    spawn(_shared, world, windows)


def _compressed(rank: int, world: int, how: str, scorer: str) -> None:
    """Eviction of a shared document equals eviction in independent runs: "document"
    (compressed before the fork, one copy shared) and "question" (each fork compressed after
    its question, over its own view of the shared pages, into pages of its own)."""
    from ringmem.eviction import H2O, EvictionPolicy, SnapKV
    n = len(QLENS)
    sc = SnapKV(kernel=1) if scorer == "snapkv" else H2O()  # H2O: scores copied on write

    def cache(seqs: int) -> ShardedKVCache:
        # granularity "layer": heads keep the same tokens, so the fork can share pages
        return ShardedKVCache(_cfg(seqs, ()), eviction=EvictionPolicy(
            scorer=sc, budget=20, sinks=1, recent=2, observe=4, granularity="layer"))

    doc = [_tokens(7 + lay, DOC) for lay in range(2)]
    shared = cache(n)
    for lay in range(2):
        _prefill(shared, lay, 0, doc[lay])
    if how == "document":
        shared.compress(seq=0)
    shared.fork(0, list(range(1, n)))
    for s in range(n):
        for lay in range(2):
            _prefill(shared, lay, s, _tokens(100 + 10 * s + lay, QLENS[s]))
        if how == "question":
            shared.compress(seq=s)
    dec = [[shared.decode(lay, *qkv) for lay, qkv in enumerate(step)]
           for step in _steps(list(range(n)))]
    for s in range(n):
        one = cache(1)
        for lay in range(2):
            _prefill(one, lay, 0, doc[lay])
        if how == "document":
            one.compress(seq=0)
        for lay in range(2):
            _prefill(one, lay, 0, _tokens(100 + 10 * s + lay, QLENS[s]))
        if how == "question":
            one.compress(seq=0)
        for t, step in enumerate(_steps([s])):
            for lay, qkv in enumerate(step):
                w = one.decode(lay, *qkv)
                assert torch.allclose(dec[t][lay][s], w[0], rtol=0, atol=1e-12), (s, t, lay)
        assert shared.head_counts_of(s, 0) == one.head_counts_of(0, 0), (rank, s)
    st = shared.stores[0]
    if how == "question" and scorer == "snapkv":  # every fork owns its pages: none shared
        assert all(st.refs[p] == 1 for t in st.tables[:n] for p in t)
    if how == "document":  # the compressed document's full pages are held once
        assert any(st.refs[p] == n for p in st.tables[0]), (rank, st.tables, st.refs)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("how,scorer", [("document", "snapkv"), ("question", "snapkv"),
                                        ("question", "h2o")])
def test_forked_eviction_equals_independent_runs(world: int, how: str, scorer: str) -> None:
    spawn(_compressed, world, how, scorer)


def test_paged_store_shares_and_copies_on_write() -> None:
    """PagedStore alone: a fork shares full pages and copies the partial one; appends and an
    all-kept `keep` leave shared pages shared; a real eviction gathers into fresh pages, or
    says beforehand how many it lacks; reset frees a page only with its last reference."""
    from ringmem.cache import PagedStore
    st = PagedStore(num_pages=6, page_size=4, kv_heads=2, head_dim=3, max_seqs=3,
                    dtype=torch.float64, device=torch.device("cpu"))
    k = torch.randn(10, 2, 3, dtype=torch.float64)
    st.append(0, k, -k, torch.arange(10))  # pages 0, 1 full; page 2 holds 2 tokens
    st.fork(0, 1)
    assert st.tables[1][:2] == st.tables[0][:2] and st.tables[1][2] != st.tables[0][2]
    assert [st.refs[p] for p in st.tables[0]] == [2, 2, 1] and st.pages_in_use == 4
    st.append(1, k[:3], k[:3], torch.arange(10, 13))  # fills its own copy, then a new page
    assert torch.equal(st.view(0)[0][0], k) and st.view(1)[0][0, 10:].equal(k[:3])
    st.keep(1, [torch.ones(13, dtype=torch.bool)] * 2)  # nothing leaves: still shared
    assert st.refs[st.tables[0][0]] == 2
    drop = torch.arange(13) % 2 == 0
    st.fork(0, 2)  # no page free now: keeping 7 of seq 1's 13 needs 2, its own 2 free up
    assert st.keep_short(1, [drop] * 2) == 0 and st.free_pages == 0
    st.keep(1, [drop] * 2)
    assert torch.equal(st.view(1)[0][0], torch.cat([k, k[:3]])[drop])
    assert torch.equal(st.view(0)[0][0], k)  # the document is untouched
    assert [st.refs[p] for p in st.tables[0][:2]] == [2, 2]  # seq 2 still shares them
    st.reset(0)
    assert all(st.refs[p] == 1 for p in st.tables[2]) and torch.equal(st.view(2)[0][0], k)
    st.reset(2)
    st.reset(1)
    assert st.free_pages == 6 and not any(st.refs)
