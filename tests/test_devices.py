"""The same checks on every device this machine has (see `_devices.py`): ring attention
(one rank) with each backend against float64, and a cache's decode steps against full
attention; on CUDA the steady-state calls run with host syncs forbidden."""
from __future__ import annotations

import pytest
import torch

import ringmem
from ringmem.backends import get_backend
from ringmem.cache import CacheConfig, ShardedKVCache
from ringmem.eviction import H2O, EvictionPolicy
from ringmem.reference import reference_attention

from _devices import DEVICES, half_dtype, no_host_sync
from _tolerance import check_close


def _backend_or_skip(name: str, device: str, dtype: torch.dtype, d: int) -> None:
    try:
        get_backend(name, torch.device(device), dtype, d)
    except ValueError as e:
        pytest.skip(f"{name} on {device} {dtype}: {e}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["torch", "sdpa", "triton"])
@pytest.mark.parametrize("wide", [False, True], ids=["fp32", "half"])
def test_ring_one_rank_on_device(device: str, backend: str, wide: bool) -> None:
    dtype = half_dtype(device) if wide else torch.float32
    d = 64
    _backend_or_skip(backend, device, dtype, d)
    g = torch.Generator().manual_seed(3)
    q, k, v, dout = (torch.randn(1, 96, h, d, generator=g) for h in (8, 2, 2, 8))
    ref, ref_lse = reference_attention(*(t.double() for t in (q, k, v)), causal=True)
    base, base_lse = reference_attention(*(t.to(dtype) for t in (q, k, v)), causal=True)
    leaves = [t.to(device, dtype).requires_grad_() for t in (q, k, v)]
    out, lse = ringmem.ring_attention(*leaves, backend=backend, return_lse=True)
    out.backward(dout.to(device, dtype))
    fails = [check_close("out", out.cpu(), ref, base, dtype),
             check_close("lse", lse.cpu(), ref_lse, base_lse.float(), torch.float32)]
    assert not [f for f in fails if f], fails
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)
    with torch.no_grad(), no_host_sync(device):  # steady state: nothing waits on the GPU
        again = ringmem.ring_attention(*leaves, backend=backend)
    assert torch.equal(again, out.detach())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("decode_backend", ["paged", "torch", "sdpa", "triton"])
@pytest.mark.parametrize("scored", [False, True], ids=["plain", "h2o"])
def test_cache_decode_on_device(device: str, decode_backend: str, scored: bool) -> None:
    """Decode steps equal full attention; with an accumulating scorer (H2O, nothing evicted)
    the step also folds each key's exact mass, still without a host sync on CUDA."""
    dtype, d, hq, hkv, n = torch.float32, 32, 4, 2, 40
    _backend_or_skip("torch" if decode_backend == "paged" else decode_backend, device,
                     dtype, d)
    cfg = CacheConfig(num_layers=1, q_heads=hq, kv_heads=hkv, head_dim=d, capacity=64,
                      page_size=8, dtype=dtype, device=device, decode_backend=decode_backend,
                      check_finite=device != "cuda")  # the finiteness check reads the host
    policy = EvictionPolicy(scorer=H2O(), budget=64, observe=4) if scored else None
    cache = ShardedKVCache(cfg, eviction=policy)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, n, h, d, generator=g) for h in (hq, hkv, hkv))
    cache.prefill_chunk(0, *(t[:, :n - 4].to(device) for t in (q, k, v)), backend="torch")
    for t in range(n - 4, n):
        step = [x[:, t:t + 1].to(device) for x in (q, k, v)]
        if t == n - 4:
            got = cache.decode(0, *step)  # first step: warm-up
        else:
            with no_host_sync(device):
                got = cache.decode(0, *step)
        ref, _ = reference_attention(q[:, t:t + 1].double(), k[:, :t + 1].double(),
                                     v[:, :t + 1].double(), causal=False)
        base, _ = reference_attention(q[:, t:t + 1], k[:, :t + 1], v[:, :t + 1], causal=False)
        fail = check_close(f"decode step {t}", got.cpu(), ref, base, dtype)
        assert fail is None, fail
    if scored:  # H2O never forgets: each of the 4 window and 4 decode queries adds mass 1
        mass = torch.stack([s.sum() for s in cache.view.entries(0, 0).scores]).cpu()
        assert torch.allclose(mass, torch.full_like(mass, 8.0), atol=1e-4), mass


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["torch", "sdpa", "triton"])
@pytest.mark.parametrize("runs", [[(0, 5), (9, 20), (30, 31)], [(3, 40)], []],
                         ids=["three runs", "one run", "no run"])
def test_backend_decode_reads_runs_in_place(device: str, backend: str, runs) -> None:
    """Backend.decode over slot runs of a pool (GQA: 8 query heads, 2 KV heads) equals
    attention over exactly those slots."""
    dtype, d = (torch.float32, 32) if device == "cpu" else (torch.bfloat16, 64)
    _backend_or_skip(backend, device, dtype, d)
    g = torch.Generator().manual_seed(5)
    k, v = (torch.randn(2, 48, d, generator=g) for _ in range(2))
    q = torch.randn(8, d, generator=g)
    impl = get_backend(backend, torch.device(device), dtype, d)
    got = impl.decode(*(t.to(device, dtype) for t in (q, k, v)), runs, d ** -0.5)
    if not runs:
        assert torch.isneginf(got.lse).all() and not got.out.any()
        return
    idx = torch.cat([torch.arange(lo, hi) for lo, hi in runs])
    kk, vv = (t[:, idx].transpose(0, 1)[None] for t in (k, v))  # [1, n, Hkv, D]
    ref, ref_lse = reference_attention(q[None, None].double(), kk.double(), vv.double(),
                                       causal=False)
    base, base_lse = reference_attention(q[None, None].to(dtype), kk.to(dtype),
                                         vv.to(dtype), causal=False)
    fails = [check_close("out", got.out.cpu(), ref[0, 0], base[0, 0], dtype),
             check_close("lse", got.lse.cpu(), ref_lse[0, :, 0], base_lse[0, :, 0].float(),
                         torch.float32)]
    assert not [f for f in fails if f], fails
