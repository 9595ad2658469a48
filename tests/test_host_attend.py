"""Host-tier attention in place (`TierPolicy(attend="host" | "auto")`, `tiers/hostattend.py`):
every host page is attended where it lives (the compiled CPU kernel; float64 pages the
torch path) and merged by lse, so decode equals float64 attention over hot + pending +
demoted entries whatever the recall budget, at worlds 1-3; "auto"'s cost rule picks by
bytes over the link vs host compute; policies it cannot serve are refused."""
from __future__ import annotations

import pytest
import torch
from test_tiered_cache import HKV, _attend, _cfg, _data, _decode, _prefill

from ringmem.cache import ShardedKVCache, TierPolicy
from ringmem.eviction import EvictionPolicy, KeyNorm
from ringmem.testing import spawn

from _tolerance import check_close


def _run(world: int, dtype: torch.dtype, tiers: TierPolicy, steps: int = 4):
    """(outputs per step, full-attention references per step, tier stats)."""
    n = 32 * world
    Q, K, V = _data(3, n + steps, dtype)
    pol = EvictionPolicy(scorer=KeyNorm(), budget=8, sinks=1, recent=2)
    cache = ShardedKVCache(_cfg(dtype), eviction=pol, tiers=tiers)
    _prefill(cache, Q, K, V, n)
    cache.compress()
    outs, refs = [], []
    for t in range(n, n + steps):
        outs.append(_decode(cache, Q, K, V, t)[0])
        refs.append(_attend(Q[t], K, V, [list(range(t + 1))] * HKV))
        cache.compress()  # demote a little more before the next step
    stats = cache.tier_stats()
    cache.close()
    return outs, refs, stats


def _exact(rank: int, world: int) -> None:
    fails = []
    for dtype in (torch.float64, torch.float32):
        host = TierPolicy(host_pages=64, recall=1, attend="host")
        outs, refs, st = _run(world, dtype, host)
        if not (st["host_pages"] > 0 and st["host_attended_bytes"] > 0
                and st["recalled_pages"] == 0):
            fails.append(f"{dtype}: host pages not attended in place: {st}")
        # the same dtype's baseline: recall every page to the hot tier (the torch path)
        base, _, _ = _run(world, dtype, TierPolicy(host_pages=64, recall=64))
        for i, (o, r, b) in enumerate(zip(outs, refs, base)):
            if dtype == torch.float64:
                if (o - r).abs().max().item() > 1e-12:
                    fails.append(f"float64 step {i}: {(o - r).abs().max().item():.3g}")
            elif (msg := check_close(f"float32 step {i}", o, r, b, dtype)) is not None:
                fails.append(msg)
        # recall=1 leaves pages out: the exactness above is the host pass's, not recall's
        few, _, _ = _run(world, dtype, TierPolicy(host_pages=64, recall=1))
        if all((f - r).abs().max().item() < 1e-6 for f, r in zip(few, refs)):
            fails.append(f"{dtype}: recall=1 recalled everything; the test proves nothing")
    assert not fails, fails[:5]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_host_pages_attended_in_place_equal_full_attention(world: int) -> None:
    spawn(_exact, world, timeout=180)


def test_auto_picks_by_bytes_over_the_link_against_host_compute() -> None:
    """Host when host_bytes / host_gbps <= recalled_bytes / link_gbps: a slow link makes
    attending every host page cheaper than recalling one; a slow host the reverse."""
    slow_link = TierPolicy(host_pages=64, recall=1, attend="auto", link_gbps=1e-6)
    _, _, st = _run(1, torch.float64, slow_link)
    assert st["host_attended_bytes"] > 0 and st["recalled_pages"] == 0
    slow_host = TierPolicy(host_pages=64, recall=1, attend="auto", host_gbps=1e-6)
    _, _, st = _run(1, torch.float64, slow_host)
    assert st["host_attended_bytes"] == 0 and st["recalled_pages"] > 0


def test_policies_host_attention_cannot_serve_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="attend must be one of"):
        TierPolicy(host_pages=4, attend="device")
    with pytest.raises(ValueError, match="disk_pages=8 use attend='recall'"):
        TierPolicy(host_pages=4, disk_pages=8, disk_dir=str(tmp_path), attend="host")
    with pytest.raises(ValueError, match="link_gbps must be a positive number"):
        TierPolicy(host_pages=4, attend="auto", link_gbps=0)
