"""Edges a reliability probe found (issue 24, item 5): boolean flags, the non-finite rule
at every world size and backend, non-finite K/V refused by the cache, and clear errors
(dtypes, devices, scales, a skipped backward, a full disk, cu_seqlens and checkpoints
that differ across ranks)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

import ringmem
from ringmem import ring_attention, shard
from ringmem.cache import CacheConfig, ShardedKVCache
from ringmem.reference import masked_reference, reference_attention
from ringmem.testing import spawn

from _tolerance import check_close

HQ, HKV, D = 4, 2, 8


def _qkv(s: int = 12, seed: int = 0, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, s, h, D, generator=g, dtype=dtype) for h in (HQ, HKV, HKV)]


def _cache(**kw) -> ShardedKVCache:
    return ShardedKVCache(CacheConfig(num_layers=1, q_heads=HQ, kv_heads=HKV, head_dim=D,
                                      capacity=32, page_size=4, dtype=torch.float64, **kw))


# ---------------------------------------------------------------- argument checks
@pytest.mark.parametrize("name,value", [("causal", "no"), ("return_lse", "no"),
                                        ("return_lse", 1), ("causal", None)])
def test_ring_attention_flags_must_be_bools(name: str, value: object) -> None:
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=f"{name} must be a bool.*{value!r}"):
        ring_attention(q, k, v, **{name: value})


def test_other_public_flags_must_be_bools() -> None:
    x = torch.randn(1, 8, 2, 4)
    with pytest.raises(TypeError, match="return_position_ids must be a bool.*'yes'"):
        shard(x, return_position_ids="yes", cu_seqlens=[0, 8])
    with pytest.raises(TypeError, match="backward must be a bool.*'no'"):
        ringmem.plan((1, 8, 2, 4), (1, 8, 2, 4), world=2, backward="no")


def test_float8_refused_naming_the_dtype() -> None:
    q, k, v = (t.to(torch.float8_e4m3fn) for t in _qkv())
    with pytest.raises(TypeError, match=r"q has dtype torch.float8_e4m3fn.*torch.float16, "
                       r"torch.bfloat16, torch.float32, torch.float64"):
        ring_attention(q, k, v)
    with pytest.raises(TypeError, match="float8_e5m2"):
        CacheConfig(num_layers=1, q_heads=2, kv_heads=2, head_dim=4, capacity=8,
                    dtype=torch.float8_e5m2)


@pytest.mark.parametrize("scale", [10 ** 400, float("nan"), float("inf"), 0, -1.0])
def test_bad_softmax_scale_names_the_argument(scale: object) -> None:
    q, k, v = _qkv()
    shown = "1000000000" if isinstance(scale, int) and scale > 1 else repr(scale)
    with pytest.raises(ValueError, match=f"softmax_scale must be a positive finite.*{shown}"):
        ring_attention(q, k, v, softmax_scale=scale)
    cache = _cache()
    with pytest.raises(ValueError, match=f"softmax_scale must be a positive finite.*{shown}"):
        cache.prefill_chunk(0, *_qkv(4, dtype=torch.float64), softmax_scale=scale)
    with pytest.raises(ValueError, match="softcap must be a positive finite.*digits"):
        ring_attention(q, k, v, softcap=10 ** 400, backend="torch")


# ---------------------------------------------------------------- the non-finite rule
def _nonfinite_rule(rank: int, world: int, backends: tuple[str, ...] = ("torch", "sdpa")
                    ) -> None:
    """k = -inf everywhere: every row NaN. One -inf key component: exactly the rows that
    see that key are NaN; every other row equals the float64 reference."""
    q, k, v = _qkv()
    for backend, causal in ((b, c) for b in backends for c in (True, False)):
        bad = torch.full_like(k, float("-inf"))
        out, lse = ring_attention(*(shard(t) for t in (q, bad, v)), causal=causal,
                                  backend=backend, return_lse=True)
        assert out.isnan().all() and lse.isnan().all(), (world, backend, causal)
        k1 = k.clone()
        k1[0, 5, 1, 0] = float("-inf")  # key 5 of KV head 1 (query heads 2, 3)
        out, lse = ring_attention(*(shard(t) for t in (q, k1, v)), causal=causal,
                                  backend=backend, return_lse=True)
        keep = torch.ones(12, 12, dtype=torch.bool)
        keep = keep.tril() if causal else keep
        ref, ref_lse = masked_reference(q.double(), k.double(), v.double(), keep)
        base, _ = masked_reference(q, k, v, keep)
        want = torch.zeros(1, 12, HQ, dtype=torch.bool)
        want[0, 5 if causal else 0:, 2:] = True  # rows that see key 5 in heads 2, 3
        ref, base, want = (shard(t) for t in (ref, base, want))
        assert torch.equal(out.isnan().any(-1), want), (world, backend, causal)
        assert torch.equal(lse.isnan(), want.transpose(1, 2))
        fine = ~want
        fail = check_close(f"finite rows w{world} {backend}", out[fine], ref[fine],
                           base[fine], torch.float32)
        assert fail is None, fail


@pytest.mark.parametrize("world", [1, 2, 3])
def test_nonfinite_rule_every_world_and_backend(world: int) -> None:
    """Backends torch and sdpa, causal and not (one spawn per world: spawns are slow)."""
    if world == 1:
        _nonfinite_rule(0, 1)
    else:
        spawn(_nonfinite_rule, world, timeout=90)


@pytest.mark.triton
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_nonfinite_rule_triton() -> None:
    """The Triton kernels (the interpreter on CPU) follow the same rule."""
    _nonfinite_rule(0, 1, ("triton",))


# ---------------------------------------------------------------- non-finite K/V and the cache
def _nonfinite_refused(rank: int, world: int) -> None:
    """A NaN/inf in k or v (on one rank's shard at prefill, in the token at decode) is
    refused on every rank before anything is stored; the next good step is exact."""
    g = torch.Generator().manual_seed(3)
    Q, K, V = (torch.randn(1, 13, h, D, generator=g, dtype=torch.float64) for h in (HQ, HKV, HKV))
    cache, fresh = _cache(), _cache()
    for c in (cache, fresh):  # chunks of 6: a multiple of worlds 1, 2 and 3
        c.prefill_chunk(0, *(c.shard_chunk(t[:, :6]) for t in (Q, K, V)))
    bad = K[:, 6:12].clone()
    bad[0, 1, 0, 3] = float("inf")  # chunk token 1 (position 7): rank 1's shard (stripe)
    parts = [cache.shard_chunk(t) for t in (Q[:, 6:12], bad, V[:, 6:12])]
    counts = cache.rank_counts(0, 0)
    mine = rank == 1 or world == 1
    with pytest.raises(ValueError, match="k holds NaN or inf at 1 token.*position 7.*nothing "
                       "was stored" if mine else r"rank\(s\) \[1\] rejected"):
        cache.prefill_chunk(0, *parts)
    assert cache.rank_counts(0, 0) == counts
    for c in (cache, fresh):  # the good chunk after the refused one
        c.prefill_chunk(0, *(c.shard_chunk(t[:, 6:12]) for t in (Q, K, V)))
    step = [t[:, 12:13] for t in (Q, K, V)]
    for name, i in (("k", 1), ("v", 2)):
        poisoned = list(step)
        poisoned[i] = step[i].clone()
        poisoned[i][0, 0, 1, 2] = float("nan")
        with pytest.raises(ValueError, match=f"decode \\(layer 0\\): {name} holds NaN or inf "
                           f"at 1 token\\(s\\) \\(first at sequence 0\\).*nothing was stored"):
            cache.decode(0, *poisoned)
        assert cache.rank_counts(0, 0) == fresh.rank_counts(0, 0)
    got, ref = cache.decode(0, *step), fresh.decode(0, *step)
    assert torch.equal(got, ref)  # bit for bit: nothing of the refused steps remains
    exact, _ = reference_attention(Q[:, 12:13], K, V, causal=False)
    low, _ = reference_attention(*(t.float() for t in (Q[:, 12:13], K, V)), causal=False)
    fail = check_close("decode after refusals", got, exact, low, torch.float32)
    assert fail is None, fail


@pytest.mark.parametrize("world", [1, 2, 3])
def test_nonfinite_kv_refused_by_cache_and_nothing_stored(world: int) -> None:
    if world == 1:
        _nonfinite_refused(0, 1)
    else:
        spawn(_nonfinite_refused, world, timeout=90)


def test_cache_finiteness_check_can_be_turned_off() -> None:
    with pytest.raises(TypeError, match="check_finite must be a bool, got 1"):
        _cache(check_finite=1)
    cache = _cache(check_finite=False)
    q, k, v = _qkv(4, dtype=torch.float64)
    k[0, 0, 0, 0] = float("nan")
    cache.prefill_chunk(0, q, k, v)  # the caller owns finiteness: stored as given
    assert cache.rank_counts(0, 0) == [4]


# ---------------------------------------------------------------- a skipped backward
def _skipped_backward(rank: int, world: int, schedule: str) -> None:
    q, k, v = (t.requires_grad_() for t in _qkv(8))
    out = ring_attention(*(shard(t.detach()).requires_grad_() for t in (q, k, v)),
                         schedule=schedule, backend="torch")
    if rank == 0:  # rank 1 never calls backward
        out.sum().backward()


def _lazy_return_group(rank: int, world: int) -> None:
    from ringmem.comm import RingComm
    if rank == 0:  # a return channel only rank 0 asks for
        RingComm(None, "bwd", op="ring_attention").prepare_returns()


@pytest.mark.parametrize("case", ["kv", "lazy"])
def test_skipped_backward_is_a_comm_timeout_naming_the_op(case: str) -> None:
    """The return channel's group is made in the forward (every rank is there), so a
    skipped backward times out in ringmem's own wait; a group still made lazily names
    the op too, never torch's bare "Wait timeout"."""
    from ringmem.testing import SpawnError
    with pytest.raises(SpawnError) as info:
        if case == "lazy":
            spawn(_lazy_return_group, 2, timeout=60, pg_timeout=2.0, grace=0.5)
        else:
            spawn(_skipped_backward, 2, case, timeout=60, pg_timeout=2.0, grace=0.5)
    r0 = info.value.results[0]
    # a timeout, or (when rank 1 gave up at the closing barrier first) its closed
    # connection: either way ringmem's error naming the op, never a bare RuntimeError
    assert r0.error_type in ("CommTimeoutError", "CommError"), r0.summary()
    assert r0.error.startswith("ring_attention (bwd"), r0.summary()
    if case == "lazy":
        assert "creating the return channel's process group" in r0.error, r0.summary()


# ---------------------------------------------------------------- a full disk
def _disk_full(rank: int, world: int) -> None:
    import errno
    import tempfile

    import ringmem.cache.tiers.records as records
    from ringmem.cache import TierPolicy
    from ringmem.eviction import EvictionPolicy, StreamingLLM
    cache = ShardedKVCache(
        CacheConfig(num_layers=1, q_heads=HQ, kv_heads=HKV, head_dim=D, capacity=64,
                    page_size=4, dtype=torch.float32),
        eviction=EvictionPolicy(scorer=StreamingLLM(), budget=8, sinks=1, recent=2),
        tiers=TierPolicy(host_pages=1, disk_pages=64, disk_dir=tempfile.mkdtemp(), recall=4))
    q, k, v = _qkv(32)
    for lo in range(0, 32, 8):
        cache.prefill_chunk(0, *(cache.shard_chunk(t[:, lo:lo + 8]) for t in (q, k, v)))
    if rank == 1:
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")
        records.open = full  # write_record's open(): shadows the builtin in that module
    with pytest.raises((OSError, ValueError)) as info:
        cache.compress()
    if rank == 1:
        e = info.value
        assert isinstance(e, OSError) and e.errno == errno.ENOSPC, repr(e)
        assert "disk tier: spilling page (layer 0" in str(e) and ".page: No space" in str(e), e
    else:
        assert "rank(s) [1]" in str(info.value), info.value


def test_disk_full_names_the_file_and_errors_on_every_rank() -> None:
    spawn(_disk_full, 2, timeout=90, pg_timeout=20.0)


# ---------------------------------------------------------------- cross-rank mismatches
def _agreed_errors(rank: int, world: int) -> None:
    """Errors found on one rank, or only by comparing ranks, at world 2 (one spawn)."""
    q, k, v = _qkv(8, seed=rank)
    # a flag: rank 1's string is truthy like rank 0's True, only the type check refuses it
    want = "return_lse must be a bool.*'yes'" if rank == 1 else r"rank\(s\) \[1\] rejected"
    with pytest.raises((TypeError, ValueError), match=want):
        ring_attention(q, k, v, return_lse="yes" if rank == 1 else True)
    # meta tensors: the device is named before any transfer
    with pytest.raises(ValueError, match="q is on device meta.*cannot communicate"):
        ring_attention(*(t.to("meta") for t in (q, k, v)))
    # cu_seqlens that differ: the values, not hashes (long ones cut, with a digest)
    cu = [0, 4 + 4 * rank, 16]
    with pytest.raises(ValueError, match=r"cu_seqlens \(rank 0: \[0, 4, 16\], rank 1: "
                                         r"\[0, 8, 16\]\)"):
        ring_attention(q, k, v, cu_seqlens=cu, layout="contiguous", backend="torch")
    long = list(range(0, 401)) if rank == 0 else list(range(0, 399)) + [400]
    with pytest.raises(ValueError, match=r"cu_seqlens \(rank 0: \[0, 1, .*, 399, 400\] "
                                         r"\(401 offsets, digest [0-9a-f]+\), rank 1: "):
        ring_attention(*(torch.randn(1, 200, h, D) for h in (HQ, HKV, HKV)),
                       cu_seqlens=long, layout="contiguous", backend="torch")


def test_errors_at_world_2_are_clear_on_every_rank() -> None:
    """A non-bool flag on one rank, meta tensors, cu_seqlens differing across ranks."""
    spawn(_agreed_errors, 2, timeout=60)


def _mixed_saves(rank: int, world: int, root: str) -> None:
    import shutil

    import torch.distributed as dist

    from ringmem.generations import current
    cache = _cache()
    q, k, v = _qkv(8, dtype=torch.float64)
    cache.prefill_chunk(0, *(cache.shard_chunk(t) for t in (q, k, v)))
    with pytest.raises(TypeError, match="fsync must be a bool, got 'yes'"):
        cache.save(f"{root}/A", model_id="m", fsync="yes")
    cache.save(f"{root}/A", model_id="m")
    cache.prefill_chunk(0, *(cache.shard_chunk(t[:, :4]) for t in (q, k, v)))
    cache.save(f"{root}/B", model_id="m")
    dist.barrier()
    if rank == 0:  # rank 1's shard of save A swapped for its shard of save B
        a, b = current(f"{root}/A"), current(f"{root}/B")
        for p in b.glob("rank00001*"):
            if p.is_dir():
                shutil.rmtree(a / p.name)
                shutil.copytree(p, a / p.name)
            else:
                shutil.copy(p, a / p.name)
    dist.barrier()
    with pytest.raises(ValueError, match=r"shard files under .*A come from different saves.*"
                       r"rank 0: .*A/gen-000001 \(state [0-9a-f]{8}\), rank 1: "
                       r".*B/gen-000001 \(state [0-9a-f]{8}\)"):
        ShardedKVCache.load(f"{root}/A", cache.config, model_id="m")
    ShardedKVCache.load(f"{root}/B", cache.config, model_id="m")  # one save: loads


def test_checkpoint_files_from_two_saves_say_so(tmp_path) -> None:
    spawn(_mixed_saves, 2, str(tmp_path), timeout=90)
