"""Several forked sequences prefilled in one chunk (`prefill_chunk(seq=[...])`): each row
attends to the shared document once for all and causally to its own tokens, exactly as
the rows prefilled one at a time; and the paged store's O(1) window drop (an offset into
the first page) keeps every token where a compaction would."""
from __future__ import annotations

import pytest
import torch

from ringmem.cache import CacheConfig, PagedStore, ShardedKVCache
from ringmem.reference import reference_attention
from ringmem.sharding import unshard
from ringmem.testing import spawn

HQ, HKV, D, PS = 4, 2, 16, 4
DOC, QLENS, STEPS = 45, (3, 6, 1, 5), 3


def _cfg(windows: tuple[int, ...]) -> CacheConfig:
    return CacheConfig(num_layers=2, q_heads=HQ, kv_heads=HKV, head_dim=D, capacity=128,
                       page_size=PS, max_seqs=len(QLENS), dtype=torch.float64,
                       windows=windows, layout="contiguous")


def _tokens(seed: int, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, n, h, D, generator=g, dtype=torch.float64) for h in (HQ, HKV, HKV)]


def _chunk(cache: ShardedKVCache, layer: int, seq: object, qkv: list[torch.Tensor],
           n_valid: object) -> torch.Tensor:
    """Prefill qkv [1, n, H, D] (one chunk, padded to the world); the full output."""
    n = qkv[0].shape[1]
    pad = -(-n // cache.world) * cache.world
    parts = [cache.shard_chunk(torch.cat([t, t.new_zeros(1, pad - n, *t.shape[2:])], 1))
             for t in qkv]
    out = cache.prefill_chunk(layer, *parts, seq=seq, n_valid=n_valid)
    return unshard(out.contiguous(), 1, layout=cache.config.layout)[:, :n]


def _document(windows: tuple[int, ...]) -> tuple[ShardedKVCache, list]:
    cache = ShardedKVCache(_cfg(windows))
    doc = [_tokens(7 + lay, DOC) for lay in range(2)]
    for lay in range(2):
        for c0 in range(0, DOC, 16):  # chunks of 16: the window slides over the document
            part = [t[:, c0:c0 + 16] for t in doc[lay]]
            _chunk(cache, lay, 0, part, part[0].shape[1])
    cache.fork(0, list(range(1, len(QLENS))))
    return cache, doc


def _packed(rank: int, world: int, windows: tuple[int, ...]) -> None:
    rows = list(range(len(QLENS)))
    qs = {(s, lay): _tokens(100 + 10 * s + lay, QLENS[s]) for s in rows for lay in range(2)}
    packed, doc = _document(windows)
    one, _ = _document(windows)
    cu = [0]
    for n in QLENS:
        cu.append(cu[-1] + n)
    for lay in range(2):
        cat = [torch.cat([qs[s, lay][j] for s in rows], 1) for j in range(3)]
        got = _chunk(packed, lay, rows, cat, list(QLENS))
        for s in rows:  # the same rows, one chunk each
            want = _chunk(one, lay, s, qs[s, lay], QLENS[s])
            assert torch.allclose(got[:, cu[s]:cu[s + 1]], want, rtol=0, atol=1e-12), (s, lay)
    for s in rows:  # the same tokens (on other ranks: the chunk splits the rows' tokens
        # between ranks as it packs them, not each row's)
        for lay in range(2):
            assert sum(packed.rank_counts(s, lay)) == sum(one.rank_counts(s, lay)), (s, lay)
        assert packed.next_position(s) == DOC + QLENS[s]
    for t in range(STEPS):  # the cached rows decode alike
        for lay in range(2):
            qkv = [torch.cat([_tokens(1000 * s + 10 * t + lay, 1)[j] for s in rows])
                   for j in range(3)]
            a, b = packed.decode(lay, *qkv), one.decode(lay, *qkv)
            assert torch.allclose(a, b, rtol=0, atol=1e-12), (t, lay)
    if windows:
        return
    for s in rows:  # against float64 full attention over the document and the row
        q, k, v = (torch.cat([doc[0][j], qs[s, 0][j]], 1) for j in range(3))
        ref, _ = reference_attention(q, k, v, causal=True)
        cat = [torch.cat([qs[r, 0][j] for r in rows], 1) for j in range(3)]
        fresh, _ = _document(windows)
        got = _chunk(fresh, 0, rows, cat, list(QLENS))
        assert torch.allclose(got[:, cu[s]:cu[s + 1]], ref[:, DOC:], rtol=0, atol=1e-12), s


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("windows", [(), (-1, 6)])
def test_packed_rows_equal_rows_one_at_a_time(world: int, windows: tuple) -> None:
    spawn(_packed, world, windows)


def _refused(rank: int, world: int) -> None:
    cache, _ = _document(())
    q = _tokens(5, 4)
    # a row that holds other tokens (one more, here) cannot share the prefix pass
    _chunk(cache, 0, 3, [t[:, :1] for t in _tokens(9, 1)], 1)
    before = ([list(t) for t in cache.stores[0].tables], cache.pages_in_use())
    with pytest.raises(ValueError, match="distinct sequences"):
        _chunk(cache, 0, [1, 1], q, [2, 2])
    with pytest.raises(ValueError, match="n_valid must list"):
        _chunk(cache, 0, [1, 2], q, [2])
    with pytest.raises(ValueError, match="n_valid must list"):
        _chunk(cache, 0, [1, 2], q, [4, 4])  # more than the chunk holds
    with pytest.raises(ValueError, match="do not hold the same cached tokens"):
        _chunk(cache, 0, [1, 3], q, [2, 2])
    assert ([list(t) for t in cache.stores[0].tables], cache.pages_in_use()) == before
    assert [cache.next_position(s) for s in range(4)] == [DOC] * 3 + [DOC + 1]
    # same positions, other values: told apart by content, not by counts
    other = ShardedKVCache(_cfg(()))
    for s, seed in ((0, 7), (1, 8)):
        _chunk(other, 0, s, _tokens(seed, 8), 8)
    with pytest.raises(ValueError, match="do not hold the same cached tokens"):
        _chunk(other, 0, [0, 1], q, [2, 2])


@pytest.mark.parametrize("world", [2, 3])
def test_packed_rows_refused_on_every_rank(world: int) -> None:
    spawn(_refused, world)


def _store(pages: int = 8) -> PagedStore:
    return PagedStore(num_pages=pages, page_size=4, kv_heads=2, head_dim=3, max_seqs=2,
                      dtype=torch.float64, device=torch.device("cpu"))


def _fill(st: PagedStore, seq: int, lo: int, hi: int) -> None:
    n = hi - lo
    k = torch.arange(lo, hi, dtype=torch.float64)[:, None, None].expand(n, 2, 3) + 0.5
    st.append(seq, k, -k, torch.arange(lo, hi))


def _held(st: PagedStore, seq: int) -> list[int]:
    k, v, pos = st.view(seq)
    assert torch.equal(k[0, :, 0, 0], pos.double() + 0.5)  # each token's k is where it was
    assert torch.equal(v[0], -k[0])
    return pos.tolist()


def test_window_drop_moves_nothing_and_frees_pages_left_behind() -> None:
    st = _store()
    _fill(st, 0, 0, 10)  # 3 pages: [0..3] [4..7] [8, 9]
    k_before = st.k.clone()
    front = torch.arange(10) >= 3
    st.keep(0, [front, front])  # a window sliding on: the 3 oldest leave
    assert _held(st, 0) == list(range(3, 10)) and st.off[0] == 3
    assert torch.equal(st.k, k_before)  # nothing moved
    assert len(st.tables[0]) == 3 and st.free_pages == 5
    st.keep(0, [torch.arange(7) >= 2] * 2)  # past the first page: it is freed
    assert _held(st, 0) == list(range(5, 10)) and st.off[0] == 1
    assert len(st.tables[0]) == 2 and st.free_pages == 6
    assert int((st.pos >= 0).sum()) == 2 * 5  # dropped slots are marked empty
    _fill(st, 0, 10, 12)  # fits behind the offset: no page taken
    assert _held(st, 0) == list(range(5, 12)) and st.free_pages == 6 and st.off[0] == 1
    _fill(st, 0, 12, 13)  # the offset would cost a page: the tokens move to the front
    assert _held(st, 0) == list(range(5, 13)) and st.off[0] == 0 and st.free_pages == 6
    st.keep(0, [torch.arange(8) >= 8] * 2)  # everything leaves
    assert st.lens[0] == 0 and st.tables[0] == [] and st.off[0] == 0 and st.free_pages == 8


def test_offset_survives_other_keeps_forks_and_a_checkpoint_table_load() -> None:
    st = _store()
    _fill(st, 0, 0, 11)
    st.keep(0, [torch.arange(11) >= 2] * 2)  # offset 2, 9 tokens in 3 pages
    mask = torch.tensor([True, False] * 4 + [True])  # not a front drop: compacted
    st.keep(0, [mask, mask])
    assert _held(st, 0) == [2, 4, 6, 8, 10] and st.off[0] == 2
    assert len(st.tables[0]) == 2
    st.fork(0, 1)  # the offset costs no page here: kept, and copied
    assert _held(st, 1) == [2, 4, 6, 8, 10] and st.off[1] == 2
    assert st.fork_pages(0) == 1  # the first page is full (2 dead + 2 tokens): shared
    again = _store()
    again.k.copy_(st.k), again.v.copy_(st.v), again.pos.copy_(st.pos)
    again.load_tables([list(t) for t in st.tables], [list(h) for h in st.hlens],
                      list(st.lens), list(st.split), st.free_list, list(st.off))
    assert _held(again, 0) == _held(st, 0) and _held(again, 1) == _held(st, 1)
    old = _store()  # a checkpoint from before offsets: all 0
    old.load_tables([[0], []], [[2, 2], [0, 0]], [2, 0], [False, False], [7, 6, 5, 4, 3, 2, 1])
    assert old.off == [0, 0]
