"""Bad cu_seqlens / window / softcap / sinks: a clear error naming the argument, raised on
every rank (never a hang), and cu_seqlens that differ across ranks are reported."""
from __future__ import annotations

import re

import pytest
import torch

import ringmem
from ringmem.testing import spawn


def _qkv(s: int = 8):
    return tuple(torch.randn(1, s, 2, 8) for _ in range(3))


BAD = {  # world-independent: global length 8 * world
    "unsorted": (lambda w: dict(cu_seqlens=[0, 5, 3, 8 * w]), ValueError,
                 "cu_seqlens must be non-decreasing, got 5 then 3"),
    "out of range": (lambda w: dict(cu_seqlens=[0, 4, 8 * w + 1]), ValueError,
                     "cu_seqlens must end at the global sequence length"),
    "not from 0": (lambda w: dict(cu_seqlens=[1, 8 * w]), ValueError,
                   "cu_seqlens must start at 0, got 1"),
    "float offsets": (lambda w: dict(cu_seqlens=torch.tensor([0.0, 8.0 * w])), TypeError,
                      "cu_seqlens must hold integers"),
    "rows": (lambda w: dict(cu_seqlens=[[0, 8 * w], [0, 8 * w]]), ValueError,
             "cu_seqlens has 2 rows of offsets but the batch has 1 rows"),
    "document without": (lambda w: dict(layout="document"), ValueError,
                         "layout 'document' needs cu_seqlens"),
    "document length": (lambda w: dict(layout="document", cu_seqlens=[0, 3]), ValueError,
                        "layout 'document' pads these documents to"),
    "window form": (lambda w: dict(window=4), TypeError,
                    r"window must be a \(left, right\) pair of ints"),
    "window value": (lambda w: dict(window=(-2, 0)), ValueError,
                     r"window sizes must be >= 0 or -1 \(unbounded\), got \(-2, 0\)"),
    "softcap zero": (lambda w: dict(softcap=0.0), ValueError,
                     "softcap must be a positive finite number, got 0.0"),
    "softcap type": (lambda w: dict(softcap="2"), TypeError, "softcap must be a positive float"),
    "sinks shape": (lambda w: dict(sinks=torch.zeros(3)), ValueError,
                    r"sinks must be a floating tensor of shape \[Hq\]=\[2\]"),
    "sinks type": (lambda w: dict(sinks=[0.0, 0.0]), TypeError, "sinks must be a torch.Tensor"),
    "softcap backend": (lambda w: dict(softcap=1.0, backend="sdpa"), ValueError,
                        "backend 'sdpa' cannot run these inputs: .*no logit softcap"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_single_process(case: str) -> None:
    make, exc, pattern = BAD[case]
    with pytest.raises(exc, match=pattern):
        ringmem.ring_attention(*_qkv(), **make(1))


def _every_rank(rank: int, world: int) -> None:
    for _case, (make, exc, pattern) in BAD.items():
        with pytest.raises(exc, match=pattern):
            ringmem.ring_attention(*_qkv(), **make(world))
    # offsets that differ across ranks: reported on every rank, not a wrong answer
    cu = [0, 3, 16] if rank == 0 else [0, 5, 16]
    with pytest.raises(ValueError, match=r"arguments differ across ranks: cu_seqlens"):
        ringmem.ring_attention(*_qkv(), cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"arguments differ across ranks: window"):
        ringmem.ring_attention(*_qkv(), window=(2, -1) if rank else (3, -1), layout="contiguous")
    with pytest.raises(ValueError, match=r"unshard: arguments differ across ranks: cu_seqlens"):
        ringmem.unshard(torch.zeros(1, 8, 2), cu_seqlens=cu)
    ringmem.ring_attention(*_qkv(), cu_seqlens=[0, 3, 16])  # the group still works


def test_bad_input_raised_on_every_rank() -> None:
    spawn(_every_rank, 2, timeout=120)


def test_shard_packing_errors() -> None:
    x = torch.zeros(2, 8, 3)
    with pytest.raises(ValueError, match="return_position_ids needs cu_seqlens"):
        ringmem.shard(x, return_position_ids=True)
    with pytest.raises(ValueError, match="layout 'document' needs cu_seqlens"):
        ringmem.shard(x, layout="document")
    msg = "cu_seqlens[1] must end at the global sequence length 8, got 7"
    with pytest.raises(ValueError, match=re.escape(msg)):
        ringmem.shard(x, layout="document", cu_seqlens=[[0, 8], [0, 7]])


def test_position_ids_restart_per_document() -> None:
    x = torch.arange(10.0)[None, :, None]
    part, ids = ringmem.shard(x, layout="document", cu_seqlens=[0, 3, 10],
                              return_position_ids=True)
    assert ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 5, 6]]
    assert torch.equal(part, x)
    assert torch.equal(ringmem.unshard(part, layout="document", cu_seqlens=[0, 3, 10]), x)
