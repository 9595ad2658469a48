"""ShardedKVCache with sliding-window layers, sinks and softcap: chunked prefill and decode
equal dense attention, windowed layers keep only their window, in smaller pools."""
from __future__ import annotations

import math

import pytest
import torch

from ringmem import unshard
from ringmem.cache import CacheConfig, ShardedKVCache
from ringmem.testing import spawn

HQ, HKV, D = 4, 2, 8


def _dense(q, k, v, left, softcap, sinks):
    """Reference: causal attention of every position over [p - left, p] (float64).
    q [S, Hq, D], k/v [S, Hkv, D] -> [S, Hq, D]."""
    s_len = q.shape[0]
    g = HQ // HKV
    kk, vv = (t.double().repeat_interleave(g, 1) for t in (k, v))
    s = torch.einsum("qhd,khd->hqk", q.double(), kk) / math.sqrt(D)
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    i = torch.arange(s_len)
    ok = i[None, :] <= i[:, None]
    if left >= 0:
        ok &= i[None, :] >= i[:, None] - left
    s = s.masked_fill(~ok, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.double()[:, None, None].expand(-1, s_len, 1)], -1)
    p = torch.softmax(s, -1)[..., :s_len]
    return torch.einsum("hqk,khd->qhd", p, vv)


def _run(rank: int, world: int, windows: tuple[int, ...], softcap: float | None,
         use_sinks: bool, options: dict | None = None) -> None:
    g = torch.Generator().manual_seed(5)
    n_prompt, n_dec, chunk = 19, 7, 4 * world
    total = n_prompt + n_dec
    q, k, v = (torch.randn(total, h, D, generator=g, dtype=torch.float64)
               for h in (HQ, HKV, HKV))
    sinks = torch.randn(HQ, generator=g, dtype=torch.float64) if use_sinks else None
    cfg = CacheConfig(num_layers=len(windows), q_heads=HQ, kv_heads=HKV, head_dim=D,
                      capacity=64, page_size=4, dtype=torch.float64, windows=windows,
                      **(options or {}))
    cache = ShardedKVCache(cfg)
    for layer, left in enumerate(windows):
        ref = _dense(q, k, v, left, softcap, sinks)
        outs = []
        for start in range(0, n_prompt, chunk):
            n = min(chunk, n_prompt - start)
            loc = [cache.shard_chunk(torch.cat([x[start:start + n],
                                                x.new_zeros(chunk - n, *x.shape[1:])])[None])
                   for x in (q, k, v)]
            o = cache.prefill_chunk(layer, *loc, n_valid=n, softcap=softcap, sinks=sinks)
            outs.append(unshard(o.contiguous(), 1, layout=cfg.layout)[0, :n])
        got = torch.cat(outs)
        assert torch.allclose(got, ref[:n_prompt], atol=1e-10), \
            f"layer {layer} prefill: {(got - ref[:n_prompt]).abs().max()}"
        for t in range(n_prompt, total):
            o = cache.decode(layer, q[t][None, None], k[t][None, None], v[t][None, None],
                             softcap=softcap, sinks=sinks)
            assert torch.allclose(o[0, 0], ref[t], atol=1e-10), \
                f"layer {layer} decode {t}: {(o[0, 0] - ref[t]).abs().max()}"
        held = cache.seq_len(0, layer)
        assert held == (min(left, total) if left >= 0 else total), (layer, held)
        assert max(cache.rank_counts(0, layer)) - min(cache.rank_counts(0, layer)) <= 2
    if any(w >= 0 for w in windows):
        assert cache.window_saved_bytes() > 0


@pytest.mark.parametrize("world", [1, 2, 3])
def test_windows_sinks_softcap_equal_dense(world: int) -> None:
    if world == 1:
        _run(0, 1, (5, -1, 0), 7.0, True)
        return
    spawn(_run, world, (5, -1, 3), 7.0, True, timeout=120)


def test_plain_windows_no_extras() -> None:
    spawn(_run, 2, (6, -1), None, False, timeout=120)


def _run_schedule(rank: int, world: int, layout: str, schedule: str) -> None:
    """`_run` with prefill_schedule, recording the chunk passes' (schedule, hop)."""
    from ringmem.cache import prefill
    seen, real = set(), prefill.ring_forward

    def recording(q, k, v, spec, *args, **kwargs):
        seen.add((spec.schedule, spec.hop))
        return real(q, k, v, spec, *args, **kwargs)
    prefill.ring_forward = recording  # this rank's process only (spawn starts fresh ones)
    _run(rank, world, (5, -1, 3), 7.0, True, dict(layout=layout, prefill_schedule=schedule))
    # the causal self-attention passes; "q" also names the cached-prefix pass (unchanged)
    want = {(schedule, 1)} | ({(schedule, -1)} if layout == "contiguous" else set())
    assert {x for x in seen if x[0] == schedule} == want, seen
    assert all(x[0] in (schedule, "q") for x in seen), seen


@pytest.mark.parametrize("world,layout,schedule", [
    (2, "stripe", "q"),
    (3, "contiguous", "allgather")])  # windowed layers: ring_hop turns the ring (-1)
def test_prefill_schedules_equal_dense(world: int, layout: str, schedule: str) -> None:
    spawn(_run_schedule, world, layout, schedule, timeout=120)


def test_prefill_schedule_checked() -> None:
    with pytest.raises(ValueError, match="prefill_schedule must be one of .*got 'auto'"):
        CacheConfig(num_layers=1, q_heads=HQ, kv_heads=HKV, head_dim=D, capacity=8,
                    prefill_schedule="auto")


def test_window_config_checked() -> None:
    with pytest.raises(ValueError, match="windows"):
        CacheConfig(num_layers=2, q_heads=HQ, kv_heads=HKV, head_dim=D, capacity=8,
                    windows=(3,))
    with pytest.raises(ValueError, match="windows"):
        CacheConfig(num_layers=1, q_heads=HQ, kv_heads=HKV, head_dim=D, capacity=8,
                    windows=(-2,))
    cfg = CacheConfig(num_layers=2, q_heads=HQ, kv_heads=HKV, head_dim=D, capacity=64,
                      page_size=4, windows=(5, -1))
    assert cfg.layer_pages(0) == 2 and cfg.layer_pages(1) == 16
