"""Sharded KV cache: chunked prefill and distributed decode against float64 full attention."""
from __future__ import annotations

import pytest
import torch

from ringmem.cache import CacheConfig, PagedStore, ShardedKVCache
from ringmem.layouts import positions
from ringmem.reference import reference_attention
from ringmem.testing import spawn

HQ, HKV, D = 4, 2, 16


def _cfg(**kw) -> CacheConfig:
    base = dict(num_layers=2, q_heads=HQ, kv_heads=HKV, head_dim=D, capacity=64, page_size=4,
                max_seqs=2, dtype=torch.float64)
    base.update(kw)
    return CacheConfig(**base)


def _bound(ref: torch.Tensor, base: torch.Tensor, dtype: torch.dtype) -> float:
    """float64: rounding; other dtypes: twice the same-dtype baseline's error plus rounding."""
    if dtype == torch.float64:
        return 1e-12
    return (2 * (base.double() - ref).abs().max().item()
            + 2 * torch.finfo(dtype).eps * ref.abs().max().item())


def _prefill(cache: ShardedKVCache, layer: int, seq: int, q, k, v, chunk: int) -> list[str]:
    """Prefill a full prompt chunk by chunk; compare every output row with the float64
    reference (q, k, v are float64; the cache's dtype is what is fed)."""
    world, rank, dtype = cache.world, cache.rank, cache.config.dtype
    ref, _ = reference_attention(q, k, v, causal=True)
    low = [t.to(dtype) for t in (q, k, v)]
    base, _ = reference_attention(*low, causal=True)
    tol = _bound(ref, base, dtype)
    fails = []
    for c0 in range(0, q.shape[1], chunk):
        n = min(chunk, q.shape[1] - c0)
        padded = -(-n // world) * world
        parts = []
        for t in low:
            piece = t[:, c0:c0 + n]
            pad = torch.zeros(1, padded - n, *t.shape[2:], dtype=t.dtype)
            parts.append(cache.shard_chunk(torch.cat([piece, pad], 1)))
        out = cache.prefill_chunk(layer, *parts, seq=seq, n_valid=n)
        pos = c0 + positions(cache.config.layout, rank, world, padded // world)
        keep = pos < c0 + n
        err = (out[0, keep].double() - ref[0, pos[keep]]).abs().max().item() \
            if keep.any() else 0.0
        if not err <= tol:
            fails.append(f"prefill layer {layer} seq {seq} chunk@{c0}: err {err:.2e} > {tol:.2e}")
    return fails


def _decode_matches_full(rank: int, world: int, merge: str, backend: str, chunk: int,
                         dtype: torch.dtype = torch.float64) -> None:
    cache = ShardedKVCache(_cfg(merge=merge, decode_backend=backend, dtype=dtype))
    g = torch.Generator().manual_seed(42)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    lens = [11, 6]
    seqs = {s: [rnd(1, n, HQ, D), rnd(1, n, HKV, D), rnd(1, n, HKV, D)]
            for s, n in enumerate(lens)}
    fails = []
    for layer in range(2):
        for s in (0, 1):
            fails += _prefill(cache, layer, s, *seqs[s], chunk)
    for step in range(9):
        q, k, v = (rnd(2, 1, h, D).to(dtype).double() for h in (HQ, HKV, HKV))
        for layer in range(2):
            out = cache.decode(layer, *(t.to(dtype) for t in (q, k, v)))
            for s in (0, 1):
                qkv = [q[s:s + 1], torch.cat([seqs[s][1], k[s:s + 1]], 1),
                       torch.cat([seqs[s][2], v[s:s + 1]], 1)]
                ref, _ = reference_attention(*qkv, causal=False)
                base, _ = reference_attention(*(t.to(dtype) for t in qkv), causal=False)
                err = (out[s:s + 1].double() - ref).abs().max().item()
                tol = _bound(ref, base, dtype)
                if not err <= tol:
                    fails.append(f"decode step {step} layer {layer} seq {s}: err {err:.2e} "
                                 f"> {tol:.2e}")
        for s in (0, 1):
            seqs[s][1] = torch.cat([seqs[s][1], k[s:s + 1]], 1)
            seqs[s][2] = torch.cat([seqs[s][2], v[s:s + 1]], 1)
    for layer in range(2):
        for s, n in enumerate(lens):
            counts = cache.rank_counts(s, layer)
            if sum(counts) != n + 9 or max(counts) - min(counts) > cache.config.page_size:
                fails.append(f"counts {counts} for layer {layer} seq {s} (length {n + 9})")
    assert not fails, f"rank {rank}: " + "\n".join(fails)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_decode_and_chunked_prefill_match_full_attention(world: int) -> None:
    spawn(_decode_matches_full, world, "allgather", "paged", 4)


@pytest.mark.parametrize("merge,backend,chunk", [("allreduce", "paged", 6),
                                                 ("allgather", "torch", 100),
                                                 ("allreduce", "sdpa", 3)])
def test_merge_backend_and_chunk_variants(merge: str, backend: str, chunk: int) -> None:
    spawn(_decode_matches_full, 3, merge, backend, chunk)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("merge", ["allgather", "allreduce"])
def test_decode_in_low_precision_at_world_3(merge: str, dtype: torch.dtype) -> None:
    """Both merges at an odd world size in the cache's other dtypes (sums of 3 partials do
    not round like sums of 2 or 4), against float64 with a same-dtype baseline."""
    spawn(_decode_matches_full, 3, merge, "paged", 4, dtype)


def _one_shot_equals_chunked(rank: int, world: int) -> None:
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 24, HQ, D, generator=g, dtype=torch.float32)
    k, v = (torch.randn(1, 24, HKV, D, generator=g) for _ in range(2))
    outs = {}
    for chunk in (c for c in (24, 12, 8, 6, 4) if c % world == 0):
        cache = ShardedKVCache(_cfg(dtype=torch.float32, num_layers=1, max_seqs=1))
        res = []
        for c0 in range(0, 24, chunk):
            parts = [cache.shard_chunk(t[:, c0:c0 + chunk]) for t in (q, k, v)]
            res.append(cache.prefill_chunk(0, *parts))
        outs[chunk] = torch.cat(res, 1)
        # the cache holds the same tokens whatever the chunking (positions in order per rank)
        assert sorted(cache.stores[0].view(0)[2].tolist()) == sorted(
            torch.cat([c0 + positions("stripe", rank, world, chunk // world)
                       for c0 in range(0, 24, chunk)]).tolist())
    ref, _ = reference_attention(q.double(), k.double(), v.double(), causal=True)
    base, _ = reference_attention(q, k, v, causal=True)
    tol = 2 * (base.double() - ref).abs().max().item() + 1e-6
    for chunk, out in outs.items():
        pos = torch.cat([c0 + positions("stripe", rank, world, chunk // world)
                         for c0 in range(0, 24, chunk)])
        assert (out[0].double() - ref[0, pos]).abs().max().item() <= tol, chunk


@pytest.mark.parametrize("world", [2, 3, 4])
def test_chunked_prefill_equals_one_shot_fp32(world: int) -> None:
    spawn(_one_shot_equals_chunked, world)


def test_paged_store_pages_runs_and_reset() -> None:
    st = PagedStore(num_pages=4, page_size=3, kv_heads=2, head_dim=5, max_seqs=2,
                    dtype=torch.float32, device=torch.device("cpu"))
    k = torch.randn(7, 2, 5)
    st.append(0, k[:4], k[:4] * 2, torch.arange(4))
    st.append(1, k[4:6], k[4:6], torch.arange(2))
    st.append(0, k[4:7], k[4:7] * 2, torch.arange(4, 7))
    assert st.tables == [[0, 1, 3], [2]] and st.lens == [7, 2] and st.free_pages == 0
    assert st.runs(0) == [(0, 6), (9, 10)]
    kk, vv, pos = st.view(0)
    assert torch.equal(kk[0], k) and torch.equal(vv[0], 2 * k) and pos.tolist() == list(range(7))
    with pytest.raises(ValueError, match="capacity exceeded"):
        st.append(1, k[:2], k[:2], torch.arange(2))
    st.reset(0)
    assert st.free_pages == 3 and st.lens[0] == 0 and st.runs(0) == []


def _errors(rank: int, world: int) -> None:
    cache = ShardedKVCache(_cfg(capacity=8, max_seqs=1))
    q1, k1, v1 = torch.zeros(1, 1, HQ, D, dtype=torch.float64), *(
        torch.zeros(1, 1, HKV, D, dtype=torch.float64) for _ in range(2))
    cases = [
        (lambda: cache.decode(2, q1, k1, v1), "layer must be an int in \\[0, 2\\), got 2"),
        (lambda: cache.decode(0, q1.float(), k1, v1), "q.dtype is torch.float32, the cache"),
        (lambda: cache.decode(0, q1.to("meta"), k1, v1), "q is on meta, the cache is on cpu"),
        (lambda: cache.decode(0, q1, torch.zeros(1, 1, 3, D, dtype=torch.float64), v1),
         "k must be \\[B, S, 2, 16\\]"),
        (lambda: cache.decode(0, q1.expand(2, 1, HQ, D), k1, v1), "decode takes all 1"),
        (lambda: cache.prefill_chunk(0, q1, k1, v1, n_valid=world + 1), "n_valid must be"),
    ]
    for call, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            call()
    # capacity: 8 tokens per rank; a 9*world-token prompt overflows on every rank alike
    n = 9 * world
    big = [torch.zeros(1, n // world, h, D, dtype=torch.float64) for h in (HQ, HKV, HKV)]
    with pytest.raises(ValueError, match="capacity exceeded"):
        cache.prefill_chunk(0, *big)
    fill = [torch.zeros(1, 8, h, D, dtype=torch.float64) for h in (HQ, HKV, HKV)]
    cache.prefill_chunk(0, *fill)  # exactly full
    with pytest.raises(ValueError, match="capacity exceeded"):
        cache.decode(0, q1, k1, v1)
    assert cache.rank_counts(0, 0) == [8] * world  # the failed calls changed nothing
    if world > 1:
        # ranks that disagree on the step fail together (rank 0 decodes layer 1, which has
        # room; the others layer 0, which is full: nobody may raise alone and hang the rest)
        with pytest.raises(ValueError, match="decode: arguments differ across ranks: layer"):
            cache.decode(1 if rank == 0 else 0, q1, k1, v1)
        # a bad input on one rank only: that rank raises its error, the others stop too
        bad = q1.float() if rank == 1 else q1
        want = "q.dtype is torch.float32" if rank == 1 else "rank\\(s\\) \\[1\\] rejected"
        with pytest.raises(ValueError, match=want):
            cache.decode(1, bad, k1, v1)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_cache_errors(world: int) -> None:
    spawn(_errors, world, timeout=60)


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="q_heads=6 must be a multiple of kv_heads=4"):
        _cfg(q_heads=6, kv_heads=4)
    with pytest.raises(ValueError, match="capacity must be a positive int"):
        _cfg(capacity=0)
    with pytest.raises(ValueError, match="merge must be one of"):
        _cfg(merge="tree")
    with pytest.raises(ValueError, match="layout must be one of"):
        _cfg(layout="ring")
    with pytest.raises(TypeError, match="config must be a CacheConfig"):
        ShardedKVCache({"num_layers": 1})


def _short_first_chunk(rank: int, world: int) -> None:
    # a first chunk of one real token leaves the other ranks with no cached prefix; the
    # next chunk's prefix pass must skip them (not crash the CPU flash op) and stay exact
    cache = ShardedKVCache(_cfg(num_layers=1, max_seqs=1))
    g = torch.Generator().manual_seed(8)
    n = 1 + 2 * world
    q = torch.randn(1, n, HQ, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, n, HKV, D, generator=g, dtype=torch.float64) for _ in range(2))
    fails = _prefill(cache, 0, 0, q, k, v, chunk=1) if world == 1 else []
    if world > 1:
        fails += _prefill_pieces(cache, q, k, v, [1, n - 1])
    assert not fails, fails
    # a bad input on one rank only: every rank raises, none waits in the collective
    bad = q[:, :world].float() if rank == 0 else q[:, :world]
    want = "q.dtype is torch.float32" if rank == 0 else "rank\\(s\\) \\[0\\] rejected"
    with pytest.raises(ValueError, match=want):
        cache.prefill_chunk(0, cache.shard_chunk(bad), cache.shard_chunk(k[:, :world]),
                            cache.shard_chunk(v[:, :world]))


def _prefill_pieces(cache, q, k, v, sizes: list[int]) -> list[str]:
    """Prefill chunks of the given real sizes (padded to the world size); check outputs."""
    world, rank = cache.world, cache.rank
    ref, _ = reference_attention(q, k, v, causal=True)
    fails, c0 = [], 0
    for n in sizes:
        padded = -(-n // world) * world
        parts = [cache.shard_chunk(torch.cat([t[:, c0:c0 + n], torch.zeros(
            1, padded - n, *t.shape[2:], dtype=t.dtype)], 1)) for t in (q, k, v)]
        out = cache.prefill_chunk(0, *parts, n_valid=n)
        pos = c0 + positions(cache.config.layout, rank, world, padded // world)
        keep = pos < c0 + n
        if keep.any() and (out[0, keep] - ref[0, pos[keep]]).abs().max() > 1e-12:
            fails.append(f"chunk@{c0} rank {rank}")
        c0 += n
    return fails


@pytest.mark.parametrize("world", [1, 3])
def test_prefill_after_a_prefix_some_ranks_lack(world: int) -> None:
    spawn(_short_first_chunk, world, timeout=60)


def _decode_inputs_differ(rank: int, world: int, merge: str, dtype: torch.dtype) -> None:
    cache = ShardedKVCache(_cfg(merge=merge, num_layers=1, max_seqs=1, dtype=dtype))
    g = torch.Generator().manual_seed(3)
    for _step in range(4):  # equal on every rank: fine (world 3 once refused this in fp32)
        q, k, v = (torch.randn(1, 1, h, D, generator=g, dtype=torch.float64).to(dtype) * 10
                   for h in (HQ, HKV, HKV))
        cache.decode(0, q, k, v)
    bad = q + (1e-3 if rank == 1 else 0.0)  # one rank decodes another token
    with pytest.raises(ValueError, match="ranks passed different q/k/v to layer 0"):
        cache.decode(0, bad, k, v)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("merge", ["allgather", "allreduce"])
def test_decode_refuses_inputs_that_differ_across_ranks(merge: str, dtype: torch.dtype,
                                                         world: int) -> None:
    spawn(_decode_inputs_differ, world, merge, dtype, timeout=120)


def _decode_beside_ring(rank: int, world: int) -> None:
    import ringmem
    from ringmem.agree import OperationMismatchError
    cache = ShardedKVCache(_cfg(num_layers=1, max_seqs=1))
    q, k, v = (torch.zeros(1, 1, h, D, dtype=torch.float64) for h in (HQ, HKV, HKV))
    with pytest.raises(OperationMismatchError,
                       match="decode.*ring_attention|ring_attention.*decode"):
        if rank == 0:
            cache.decode(0, q, k, v)
        else:
            ringmem.ring_attention(*(torch.zeros(1, 4, 2, 8) for _ in range(3)))


def test_decode_and_another_operation_fail_fast_on_both_ranks() -> None:
    spawn(_decode_beside_ring, 2, timeout=60)
