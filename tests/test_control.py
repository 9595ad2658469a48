"""Cross-rank checks travel on the CPU (`comm.control_group`), once per call, so they never
synchronise the host with the GPU; a twin group of a sub-group is created by its members
alone without a hang."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import ringmem
from ringmem.agree import CAPACITY, HEADER, agree
from ringmem.cache import CacheConfig, ShardedKVCache
from ringmem.comm import control_group, cpu_twin
from ringmem.testing import spawn


def _record(log: list) -> None:
    """Wrap the all-gathers ringmem uses so each call logs (dtype, numel, device, backend)."""
    for name in ("all_gather_into_tensor", "all_gather_single"):
        real = getattr(dist, name, None)
        if real is None:
            continue

        def wrapped(out, x, *args, _real=real, **kwargs):
            g = kwargs.get("group")
            log.append((x.dtype, x.numel(), x.device.type, dist.get_backend(g)))
            return _real(out, x, *args, **kwargs)
        setattr(dist, name, wrapped)


def _checks_per_call(rank: int, world: int) -> None:
    log: list = []
    _record(log)
    row = CAPACITY + HEADER
    q, k, v = (torch.randn(1, 8, h, 16) for h in (4, 2, 2))
    for n in (3, 2):  # two call signatures, several calls each: one check per call
        log.clear()
        for _ in range(n):
            ringmem.ring_attention(q[:, :n * 2], k[:, :n * 2], v[:, :n * 2], layout="stripe")
        checks = [e for e in log if e[:2] == (torch.int64, row)]
        assert len(checks) == n and len(log) == n, log  # nothing else is gathered
        assert all(e[2] == "cpu" and e[3] == "gloo" for e in checks), checks
    # a decode step: one small CPU row (the step check) plus the merge itself
    cache = ShardedKVCache(CacheConfig(num_layers=1, q_heads=4, kv_heads=2, head_dim=16,
                                       capacity=32, page_size=8, dtype=torch.float32))
    log.clear()
    g = torch.Generator().manual_seed(0)  # every rank decodes the same token
    qd, kd, vd = (torch.randn(1, 1, h, 16, generator=g) for h in (4, 2, 2))
    cache.decode(0, qd, kd, vd)
    steps = [e for e in log if e[0] == torch.int64]
    # the step check is an agree() row (layer, scale, next positions and lengths), tagged
    # "decode", so it has the length of every other operation's row
    assert len(steps) == 1 and steps[0][1] == row and steps[0][2] == "cpu", log
    assert len(log) == 2, log  # + the all-gather merge of (out, lse)
    # the softmax scale must agree too (it used to be taken per rank, silently)
    with pytest.raises(ValueError, match="softmax_scale \\(rank 0: 0.5, rank 1: 0.25\\)"):
        cache.decode(0, qd, kd, vd, softmax_scale=0.5 / (1 + rank))


def test_one_cpu_check_per_call() -> None:
    spawn(_checks_per_call, 2, timeout=60)


def _twins(rank: int, world: int) -> None:
    assert control_group(None) is None  # the default group is gloo here: used as it is
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates both
    mine = pairs[rank // 2]
    twin = cpu_twin(mine)  # only the pair's members call this: no hang, no name clash
    assert dist.get_process_group_ranks(twin) == dist.get_process_group_ranks(mine)
    agree("twin", twin, None, pair=rank // 2)  # equal within the pair
    with pytest.raises(ValueError, match="x \\(rank 0: 0, rank 1: 1\\)"):
        agree("twin", twin, None, x=rank % 2)


def test_cpu_twin_of_a_sub_group() -> None:
    spawn(_twins, 4, timeout=60)


def _odd_failures(rank: int, world: int) -> None:
    q, k, v = (torch.randn(1, 8, h, 16) for h in (4, 2, 2))
    # a head dim of 0 is refused on rank 1 only: rank 0 must not go on into the ring, it
    # stops too
    if rank == 1:
        with pytest.raises(ValueError, match="a head dim of at least 1"):
            ringmem.ring_attention(q[..., :0], k[..., :0], v[..., :0])
    else:
        with pytest.raises(ValueError, match="rank\\(s\\) \\[1\\] rejected"):
            ringmem.ring_attention(q, k, v)
    # meta tensors on one rank: a mismatch named on both
    args = (q, k, v) if rank == 0 else (q.to("meta"), k.to("meta"), v.to("meta"))
    with pytest.raises(ValueError, match="device type \\(rank 0: cpu, rank 1: meta\\)"):
        ringmem.ring_attention(*args)
    out = ringmem.ring_attention(q, k, v)  # and the ranks still pair their calls
    assert out.shape == q.shape


def test_failures_of_any_type_stop_every_rank() -> None:
    spawn(_odd_failures, 2, timeout=60)


def _unshard_exact(rank: int, world: int) -> None:
    # the old fixed-width rows compared dtypes coarsely and only 5 dims: these reached gloo
    x = torch.zeros(1, 4, 2, dtype=torch.int32 if rank == 0 else torch.int64)
    with pytest.raises(ValueError, match="dtype \\(rank 0: torch.int32, rank 1: torch.int64\\)"):
        ringmem.unshard(x, layout="stripe")
    y = torch.zeros(1, 4, 1, 1, 1, 2 + rank)
    with pytest.raises(ValueError, match="x.shape \\(rank 0: \\(1, 4, 1, 1, 1, 2\\), rank 1: "
                                         "\\(1, 4, 1, 1, 1, 3\\)\\)"):
        ringmem.unshard(y, layout="stripe")


def test_unshard_compares_exact_dtype_and_every_dim() -> None:
    spawn(_unshard_exact, 2, timeout=60)
