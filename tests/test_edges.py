"""Edges a reliability probe found (issue 24, item 5): boolean flags, the non-finite rule
at every world size and backend, non-finite K/V refused by the cache, and clear errors
(dtypes, devices, scales, a skipped backward, a full disk, cu_seqlens and checkpoints
that differ across ranks)."""
from __future__ import annotations

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
