"""Memory offsets past 2^31 elements: every kernel addresses with int64.

Without a GPU and without 8+ GB of RAM: the tensors are views with huge strides into one
lazily backed anonymous mapping (MAP_NORESERVE, untouched pages cost nothing), and only the
few elements the test writes and the kernels read are ever touched. The interpreter
computes index arithmetic in the kernel's integer types (int32 products wrap as on a GPU),
so a kernel that multiplies an int32 index by a stride reads or writes the wrong element
(the views start 2^31 elements into the mapping, so wrapped offsets stay inside it and fail
as wrong values, not as a crash). Each result must equal, bit for bit, the same kernel on
compact copies of the same data.
"""
from __future__ import annotations

import mmap
import sys

import pytest
import torch

pytest.importorskip("triton")

from ringmem.kernels.attention import _launch_fwd, attention_fwd  # noqa: E402
from ringmem.kernels.backward import attention_bwd  # noqa: E402
from ringmem.kernels.decode import decode_runs  # noqa: E402
from ringmem.kernels.merge import merge_rows  # noqa: E402

from _devices import INTERPRET  # noqa: E402

pytestmark = [pytest.mark.triton,
              pytest.mark.skipif(not INTERPRET, reason="host-memory views: interpreter only"),
              pytest.mark.skipif(sys.platform != "linux", reason="needs MAP_NORESERVE")]
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux value; Python 3.11 lacks it
BASE = 2**31  # element offset of every view: int32-wrapped offsets land inside the mapping


def _space(nelem: int, dtype: torch.dtype) -> tuple[mmap.mmap, torch.Tensor]:
    """A zero-filled 1-D tensor of `nelem` elements whose pages exist only once touched."""
    size = nelem * torch.empty(0, dtype=dtype).element_size()
    mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | MAP_NORESERVE)
    return mm, torch.frombuffer(mm, dtype=dtype)


def _fill(view: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    view.copy_(torch.randn(view.shape, generator=gen).to(view.dtype))
    return view


SQ, HQ, HKV, D = 20, 2, 1, 16
TOK = 2**27 + 64  # token stride: tokens 16..19 start past element 2^31
LSE_HEAD = 2**31 + 4224  # lse head stride: lies between token 16's and token 17's elements


def _attention_views() -> tuple[mmap.mmap, dict[str, torch.Tensor]]:
    """q/k/v/dO/out [1, 20, H, 16] interleaved per token, lse [1, 2, 20], q/k/v/dO filled."""
    mm, space = _space(BASE + SQ * TOK + 256, torch.float32)
    g = torch.Generator().manual_seed(5)

    def view(shape: tuple, offset: int, strides: tuple | None = None) -> torch.Tensor:
        strides = strides or (SQ * TOK, TOK, D, 1)
        return space.as_strided(shape, strides, BASE + offset)

    t = {"q": view((1, SQ, HQ, D), 0), "k": view((1, SQ, HKV, D), 32),
         "v": view((1, SQ, HKV, D), 48), "dout": view((1, SQ, HQ, D), 64),
         "out": view((1, SQ, HQ, D), 96), "lse": view((1, HQ, SQ), 128, (2 * LSE_HEAD,
                                                                       LSE_HEAD, 1))}
    for name in ("q", "k", "v", "dout"):
        _fill(t[name], g)
    return mm, t


def test_forward_offsets_past_2_31() -> None:
    _mm, t = _attention_views()
    _launch_fwd(t["q"], t["k"], t["v"], t["out"], t["lse"], 0.3, True, 0, 0)
    out_c, lse_c = attention_fwd(t["q"].clone(), t["k"].clone(), t["v"].clone(), 0.3, True)
    assert torch.equal(t["out"], out_c), "forward output differs past 2^31"
    assert torch.equal(t["lse"], lse_c), "forward lse differs past 2^31"


def test_backward_offsets_past_2_31() -> None:
    _mm, t = _attention_views()
    qc, kc, vc, doc = (t[n].clone() for n in ("q", "k", "v", "dout"))
    out_c, lse_c = attention_fwd(qc, kc, vc, 0.3, True)
    t["out"].copy_(out_c)
    grads = attention_bwd(t["dout"], t["q"], t["k"], t["v"], t["out"], lse_c, 0.3, True)
    grads_c = attention_bwd(doc, qc, kc, vc, out_c, lse_c, 0.3, True)
    for name, a, b in zip(("dq", "dk", "dv"), grads, grads_c):
        assert torch.equal(a, b), f"{name} differs past 2^31"


def test_decode_runs_offsets_past_2_31() -> None:
    """A paged pool whose second KV head and upper slots lie past element 2^31."""
    hkv, d, rec, slots = 2, 16, 48, 2**25 + 2**24  # slot record: k at 0, v at 16
    head = slots * rec  # > 2^31: the second head's offsets overflow int32
    _mm, space = _space(BASE + hkv * head, torch.float16)
    pool = lambda off: space.as_strided((hkv, slots, d), (head, rec, 1), BASE + off)
    k, v = pool(0), pool(16)
    runs = [(5, 30), (slots - 70, slots - 33)]  # slot * 48 > 2^31 in the second run
    g = torch.Generator().manual_seed(6)
    kc, vc = torch.zeros(hkv, 100, d, dtype=torch.float16), torch.zeros(hkv, 100, d,
                                                                          dtype=torch.float16)
    for (lo, hi), (clo, chi) in zip(runs, [(5, 30), (40, 77)]):
        kc[:, clo:chi] = _fill(k[:, lo:hi], g)
        vc[:, clo:chi] = _fill(v[:, lo:hi], g)
    q = torch.randn(8, d, generator=g).half()
    got = decode_runs(q, k, v, runs, 0.25, 3)
    want = decode_runs(q, kc, vc, [(5, 30), (40, 77)], 0.25, 3)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_merge_offsets_past_2_31() -> None:
    """Stacked partials [3, 40, 16] whose rows 32.. start past element 2^31."""
    n, r, d, row = 3, 40, 16, 2**26 + 128
    _mm, space = _space(BASE + r * row, torch.float32)
    g = torch.Generator().manual_seed(7)
    outs = _fill(space.as_strided((n, r, d), (64, row, 1), BASE), g)
    lses = torch.randn(n, r, generator=g)
    got = merge_rows(outs, lses)
    want = merge_rows(outs.clone(), lses)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
