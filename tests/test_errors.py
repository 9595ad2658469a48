"""Bad input -> ValueError/TypeError naming the argument and value, on every rank, no hang."""
from __future__ import annotations

import pytest
import torch

import ringmem
from ringmem.testing import spawn


def _qkv(s: int = 8, hq: int = 4, hkv: int = 2, d: int = 16, dtype=torch.float32):
    return (torch.randn(2, s, hq, d, dtype=dtype), torch.randn(2, s, hkv, d, dtype=dtype),
            torch.randn(2, s, hkv, d, dtype=dtype))


BAD_CALLS = {
    "q not a tensor": (lambda q, k, v: ringmem.ring_attention(q.tolist(), k, v),
                       TypeError, "q must be a torch.Tensor"),
    "causal not bool": (lambda q, k, v: ringmem.ring_attention(q, k, v, causal="yes"),
                        TypeError, "causal must be a bool, got 'yes'"),
    "scale type": (lambda q, k, v: ringmem.ring_attention(q, k, v, softmax_scale="0.1"),
                   TypeError, "softmax_scale must be a float"),
    "scale value": (lambda q, k, v: ringmem.ring_attention(q, k, v, softmax_scale=-1.0),
                    ValueError,
                    r"softmax_scale must be a positive finite number \(>= 1.18e-38\), got -1.0"),
    "3-D q": (lambda q, k, v: ringmem.ring_attention(q[0], k, v),
              ValueError, r"q must be 4-D \[B, S_local, H, D\], got shape \(8, 4, 16\)"),
    "int dtype": (lambda q, k, v: ringmem.ring_attention(q.long(), k.long(), v.long()),
                  ValueError, "q must have a floating dtype, got torch.int64"),
    "dtype mismatch": (lambda q, k, v: ringmem.ring_attention(q, k.double(), v),
                       ValueError, "q, k, v must share a dtype"),
    "device mismatch": (lambda q, k, v: ringmem.ring_attention(q, k.to("meta"), v),
                        ValueError, "q, k, v must be on one device"),
    "k/v shapes": (lambda q, k, v: ringmem.ring_attention(q, k, v[:, :, :1]),
                   ValueError, "k and v must have the same shape"),
    "seq mismatch": (lambda q, k, v: ringmem.ring_attention(q[:, :6], k, v),
                     ValueError,
                     "must agree on batch, head dim and \\(when causal\\) local sequence length"),
    "heads": (lambda q, k, v: ringmem.ring_attention(q[:, :, :3], k, v),
              ValueError, r"q.shape\[2\]=3\) must be a multiple .* \(k.shape\[2\]=2\)"),
    "layout": (lambda q, k, v: ringmem.ring_attention(q, k, v, layout="ring"),
               ValueError, "layout must be one of .* got 'ring'"),
    "schedule": (lambda q, k, v: ringmem.ring_attention(q, k, v, schedule="tree"),
                 ValueError, "schedule must be one of .* got 'tree'"),
    "backend": (lambda q, k, v: ringmem.ring_attention(q, k, v, backend="cudnn"),
                ValueError, "backend must be one of .* got 'cudnn'"),
    "shard dim": (lambda q, k, v: ringmem.shard(q, dim=4), ValueError, "dim=4 is out of range"),
    "shard type": (lambda q, k, v: ringmem.shard([1, 2]), TypeError, "x must be a torch.Tensor"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_single_process(case: str) -> None:
    call, exc, pattern = BAD_CALLS[case]
    with pytest.raises(exc, match=pattern):
        call(*_qkv())


def _expect_same_error(rank: int, world: int, make_call, pattern: str, out_dir: str) -> None:
    try:
        make_call(rank)
    except ValueError as e:
        import re
        assert re.search(pattern, str(e)), str(e)
        with open(f"{out_dir}/rank{rank}.txt", "w") as f:
            f.write(str(e))
        return
    raise AssertionError(f"rank {rank}: no error raised")


def _shape_mismatch(rank: int):
    q, k, v = _qkv(s=8 if rank == 0 else 6)
    ringmem.ring_attention(q, k, v)


def _dtype_mismatch(rank: int):
    ringmem.ring_attention(*_qkv(dtype=torch.float32 if rank == 0 else torch.bfloat16))


def _layout_mismatch(rank: int):
    ringmem.ring_attention(*_qkv(), layout="zigzag" if rank == 0 else "stripe")


def _causal_mismatch(rank: int):
    ringmem.ring_attention(*_qkv(), causal=rank == 0)


def _grad_mismatch(rank: int):
    q, k, v = _qkv()
    ringmem.ring_attention(q.requires_grad_(rank == 0), k, v)


def _unshard_mismatch(rank: int):
    ringmem.unshard(torch.zeros(2, 4 if rank == 0 else 6, 3))


MISMATCHES = {
    "shape": (_shape_mismatch, r"arguments differ across ranks: q.shape \(rank 0: \(2, 8, 4, "
                               r"16\), rank 1: \(2, 6, 4, 16\)\)"),
    "dtype": (_dtype_mismatch, r"dtype \(rank 0: torch.float32, rank 1: torch.bfloat16\)"),
    "layout": (_layout_mismatch, r"layout \(rank 0: zigzag, rank 1: stripe\)"),
    "causal": (_causal_mismatch, r"causal \(rank 0: 1, rank 1: 0\)"),
    "requires grad": (_grad_mismatch, r"requires grad \(rank 0: 1, rank 1: 0\)"),
    "unshard": (_unshard_mismatch, r"unshard: arguments differ across ranks: x.shape"),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_cross_rank_mismatch_fails_fast_on_every_rank(case: str, tmp_path) -> None:
    call, pattern = MISMATCHES[case]
    spawn(_expect_same_error, 2, call, pattern, str(tmp_path), timeout=60)
    msgs = {p.read_text() for p in tmp_path.glob("rank*.txt")}
    assert len(list(tmp_path.glob("rank*.txt"))) == 2 and len(msgs) == 1, msgs


def _one_rank_rejects(rank: int, world: int, out_dir: str) -> None:
    # only rank 1 passes a bad head count; rank 0 must not hang in the ring waiting for it
    q, k, v = _qkv(hq=3 if rank == 1 else 4, hkv=2)
    with pytest.raises(ValueError) as info:
        ringmem.ring_attention(q, k, v)
    want = "multiple of the number of key/value heads" if rank == 1 else r"rank\(s\) \[1\] rejected"
    import re
    assert re.search(want, str(info.value)), str(info.value)


def test_error_on_one_rank_stops_all_ranks(tmp_path) -> None:
    spawn(_one_rank_rejects, 3, str(tmp_path), timeout=60)


def _indivisible(rank: int, world: int) -> None:
    with pytest.raises(ValueError, match="local sequence length must be even, got 5"):
        ringmem.ring_attention(*_qkv(s=5), layout="zigzag")
    ringmem.ring_attention(*_qkv(s=5), layout="stripe")  # stripe/contiguous take any length
    with pytest.raises(ValueError, match="not a positive multiple of 4"):
        ringmem.shard(torch.zeros(1, 10, 2), layout="zigzag")


def test_layout_cannot_split(tmp_path) -> None:
    spawn(_indivisible, 2, timeout=60)


def _shard_roundtrip(rank: int, world: int) -> None:
    for layout in ringmem.layouts.PLAIN_LAYOUTS:
        x = torch.arange(3 * 2 * world * 6).reshape(3, 2 * world * 6).float()
        part = ringmem.shard(x, dim=1, layout=layout)
        assert part.shape == (3, 12)
        assert torch.equal(ringmem.unshard(part, dim=1, layout=layout), x)
        assert torch.equal(ringmem.unshard(ringmem.shard(x, dim=-1, layout=layout), dim=-1,
                                           layout=layout), x)


@pytest.mark.parametrize("world", [2, 3])
def test_shard_unshard_roundtrip(world: int) -> None:
    spawn(_shard_roundtrip, world, timeout=60)
