"""The paged run-list decode kernel (`decode_runs`) and the Triton backend's decode.

One query token against slot ranges of [Hkv, slots, D] pools, against a float64 reference
with a same-dtype baseline: several runs, GQA/MQA, odd lengths and head dims, empty runs,
splits inside runs, more query heads per KV head than one tile holds, the empty run list.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from ringmem.backends.torch_ref import TorchBackend  # noqa: E402
from ringmem.backends.triton_backend import TritonBackend  # noqa: E402
from ringmem.kernels.decode import decode_runs, split_runs  # noqa: E402

from _devices import device_dtypes, devices  # noqa: E402
from _tolerance import check_close  # noqa: E402

pytestmark = pytest.mark.triton

# (Hq, Hkv, D, slots, runs, num_splits)
RUN_CASES = {
    "gqa three runs": (8, 2, 40, 400, [(3, 40), (100, 101), (200, 333)], None),
    "splits inside runs": (8, 2, 40, 400, [(3, 40), (100, 101), (200, 333)], 9),
    "mqa empty runs": (4, 1, 96, 300, [(0, 0), (10, 150), (150, 150), (151, 299)], 3),
    "80 heads per kv": (80, 1, 16, 100, [(5, 90)], 2),
    "d256 class": (4, 2, 160, 200, [(7, 70), (100, 190)], 4),
    "one key": (4, 4, 16, 10, [(3, 4)], None),
}


def runs_attention(q, k, v, runs, scale):
    """Plain PyTorch attention of q [Hq, D] over the gathered slots, in q's dtype."""
    idx = torch.cat([torch.arange(lo, hi, device=q.device) for lo, hi in runs])
    g = q.shape[0] // k.shape[0]
    kx, vx = k[:, idx].repeat_interleave(g, 0), v[:, idx].repeat_interleave(g, 0)
    s = torch.einsum("hd,hnd->hn", q, kx) * scale
    lse = torch.logsumexp(s.float(), -1)
    p = torch.exp(s.float() - lse[:, None]).to(q.dtype)
    return torch.einsum("hn,hnd->hd", p, vx), lse


def _inputs(hq: int, hkv: int, d: int, slots: int, device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(hq, d, generator=g).to(device, dtype)
    k, v = (torch.randn(hkv, slots, d, generator=g).to(device, dtype) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("device, dtype", device_dtypes())
@pytest.mark.parametrize("case", list(RUN_CASES))
def test_decode_runs(device: str, dtype: torch.dtype, case: str) -> None:
    hq, hkv, d, slots, runs, splits = RUN_CASES[case]
    q, k, v = _inputs(hq, hkv, d, slots, device, dtype)
    out, lse = decode_runs(q, k, v, runs, 0.25, splits)
    assert out.shape == (hq, d) and lse.shape == (hq,)
    assert out.dtype == lse.dtype == torch.float32
    live = [r for r in runs if r[1] > r[0]]
    ref, ref_lse = runs_attention(q.double(), k.double(), v.double(), live, 0.25)
    base, base_lse = runs_attention(q, k, v, live, 0.25)
    fails = [check_close("out", out, ref, base, dtype),
             check_close("lse", lse, ref_lse, base_lse, dtype)]
    assert not [f for f in fails if f], fails


@pytest.mark.parametrize("device", devices())
def test_decode_runs_without_keys(device: str) -> None:
    q, k, v = _inputs(4, 2, 16, 20, device, torch.float32)
    for runs in ([], [(5, 5)], [(0, 0), (19, 19)]):
        out, lse = decode_runs(q, k, v, runs, 0.25)
        assert torch.equal(out, torch.zeros_like(out))
        assert torch.isneginf(lse).all()


@pytest.mark.parametrize("device", devices())
def test_backend_decode_reads_runs_in_place(device: str) -> None:
    q, k, v = _inputs(8, 2, 32, 300, device, torch.float32)
    runs = [(0, 17), (40, 41), (100, 299)]
    got = TritonBackend().decode(q, k, v, runs, 0.3)
    ref = TorchBackend().decode(q, k, v, runs, 0.3)
    assert got.out.dtype == got.lse.dtype == torch.float32
    assert (got.out - ref.out).abs().max() < 1e-5 and (got.lse - ref.lse).abs().max() < 1e-5
    empty = TritonBackend().decode(q, k, v, [], 0.3)
    assert torch.equal(empty.out, torch.zeros(8, 32, device=device))
    assert torch.isneginf(empty.lse).all() and empty.lse.shape == (8,)


@pytest.mark.parametrize("runs", [[(3, 40), (100, 101), (200, 333), (400, 1000)],
                                  [(2 * i * 48, 2 * i * 48 + 48) for i in range(50)]])
def test_split_runs_cuts_whole_tiles_inside_runs(runs: list[tuple[int, int]]) -> None:
    keys = [s for lo, hi in runs for s in range(lo, hi)]
    for splits in (1, 2, 5, 17, 1000):
        ranges, starts = split_runs(torch.tensor(runs), splits, 16)
        ranges, starts = ranges.tolist(), starts.tolist()
        # the ranges, in order, are exactly the runs' slots, each inside one run
        assert [s for lo, hi in ranges for s in range(lo, hi)] == keys
        assert all(any(rl <= lo < hi <= rh for rl, rh in runs) for lo, hi in ranges)
        sizes = [sum(hi - lo for lo, hi in ranges[a:b]) for a, b in zip(starts, starts[1:])]
        assert all(n > 0 for n in sizes) and len(set(sizes[:-1])) <= 1
        assert all(n % 16 == 0 for n in sizes[:-1]) and len(sizes) <= splits


def test_decode_runs_argument_errors() -> None:
    q, k, v = _inputs(4, 2, 16, 20, "cpu", torch.float32)
    with pytest.raises(ValueError, match="runs"):
        decode_runs(q, k, v, [(5, 3)], 0.3)
    with pytest.raises(ValueError, match="runs"):
        decode_runs(q, k, v, [(5, 21)], 0.3)
    with pytest.raises(ValueError, match="runs"):
        decode_runs(q, k, v, [(1, 2, 3)], 0.3)
    with pytest.raises(ValueError, match="q"):
        decode_runs(q[None], k, v, [(0, 5)], 0.3)
    with pytest.raises(ValueError, match="heads"):
        decode_runs(q[:3], k, v, [(0, 5)], 0.3)
    with pytest.raises(TypeError, match="dtype"):
        decode_runs(q.half(), k, v, [(0, 5)], 0.3)
