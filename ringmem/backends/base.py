"""The block-attention backend protocol every ring step and every decode step calls.

Tensors are [B, S, H, D] (flash-attn layout); K/V may have fewer heads than Q (GQA/MQA:
query head h uses key head h // (Hq // Hkv)). `causal=True` means a square block with key
j visible from query i iff j <= i; a band (lo, hi) means lo <= j - i <= hi (None: unbounded;
`ringmem.masking`), which backends that report `unsupported(..., bands=True) is None` take.
`softcap` (> 0) caps logits as softcap * tanh(s / softcap) (Gemma 2), for backends that
report `unsupported(..., softcap=True) is None`. lse is [B, Hq, Sq], natural log, fp32
(fp64 for fp64).

`decode` (one query against a paged K/V pool) has a default: `fwd` once per run of slots,
on views of the pool (no copy), with the G query heads of each KV head as G query rows, so
K/V are never expanded for GQA; the runs' partials merge by lse. Backends with a better way
override it: the torch backend reads the pages in place, Triton runs split-KV.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from ..partial import Partial, empty, merge

Mask = bool | tuple[int | None, int | None]  # causal flag, or a band (lo, hi)


@runtime_checkable
class Backend(Protocol):
    name: str

    def unsupported(self, device: torch.device, dtype: torch.dtype, head_dim: int, *,
                    bands: bool = False, softcap: bool = False) -> str | None:
        """Why this backend cannot run these inputs (with band masks / a softcap when
        asked), or None when it can."""

    def fwd(self, q: Tensor, k: Tensor, v: Tensor, scale: float, causal: Mask, *,
            softcap: float = 0.0) -> tuple[Tensor, Tensor]:
        """(out [B, Sq, Hq, D] in q.dtype, lse [B, Hq, Sq] fp32)."""

    def bwd(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
            scale: float, causal: Mask, *, softcap: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
        """(dq, dk, dv) of this block given the *global* out and lse of the query rows.

        Gradients may come back in q.dtype or wider; the ring accumulates them in fp32.
        """

    def decode(self, q: Tensor, k: Tensor, v: Tensor, runs: Sequence[tuple[int, int]],
               scale: float) -> Partial:
        """One query q [Hq, D] against the slots `runs` of pools k, v [Hkv, slots, D]:
        Partial(out [Hq, D], lse [Hq]) in acc dtype (lse = -inf for no slots)."""
        hq, d = q.shape
        hkv = k.shape[0]
        if not runs:
            return empty((hq,), d, q.dtype, q.device)
        # [1, G, Hkv, D]: query head h * G + g is row g of KV head h (MHA-shaped, no copy)
        rows = q.reshape(hkv, hq // hkv, d).permute(1, 0, 2).unsqueeze(0)
        parts = []
        for lo, hi in runs:
            kk, vv = (t[:, lo:hi].permute(1, 0, 2).unsqueeze(0) for t in (k, v))
            o, l = self.fwd(rows, kk, vv, scale, False)
            parts.append(Partial(o[0].permute(1, 0, 2).reshape(hq, d), l[0].reshape(hq)))
        return merge(parts)  # in acc dtype, one part or many


def propagate_nonfinite(q: Tensor, out: Tensor, lse: Tensor, k: Tensor | None = None,
                        v: Tensor | None = None, mask: Mask = False) -> tuple[Tensor, Tensor]:
    """ringmem's rule for non-finite inputs: a query row holding NaN/inf, or one that sees
    (under `mask`) a key or value holding NaN/inf, gives NaN out and lse. Fused ops return
    zeros, -inf or a finite lse there (an all -inf key row is "masked" to them), so the ring
    applies this to every block of every backend; no host sync on a GPU."""
    if _finite_on_cpu(q, *(() if k is None or v is None else (k, v))):
        return out, lse  # the common case, proven by one fast reduction per tensor
    bad = _bad_rows(q)  # [B, Sq, Hq]
    if k is not None and v is not None:
        bad = bad | _sees_bad_key(k, v, mask, q.shape[1], q.shape[2])
    return (out.masked_fill(bad.unsqueeze(-1), float("nan")),
            lse.masked_fill(bad.transpose(1, 2), float("nan")))


def _finite_on_cpu(*ts: Tensor) -> bool:
    """True when every tensor is on the CPU and its sum is finite, so every value is (a sum
    that overflows only sends the caller down the exact per-row path). One reduction per
    tensor, far cheaper than the per-row check; on a GPU reading it would be a host sync,
    so there the per-row reductions always run, at device speed."""
    for t in ts:
        if t.device.type != "cpu":
            return False
        if t.dtype == torch.float16:  # its sum overflows at 65504: use the extremes
            if not (bool(torch.isfinite(t.amax())) and bool(torch.isfinite(t.amin()))):
                return False
        elif not bool(torch.isfinite(t.sum())):
            return False
    return True


def _bad_rows(x: Tensor) -> Tensor:
    """bool [...]: rows (over the last dim) holding NaN or inf. amax/amin propagate NaN and
    show an inf; on the CPU they run ~20x faster than isfinite(x).all(-1)."""
    return ~(torch.isfinite(x.amax(-1)) & torch.isfinite(x.amin(-1)))


def _sees_bad_key(k: Tensor, v: Tensor, mask: Mask, sq: int, hq: int) -> Tensor:
    """bool [B, Sq, Hq]: the row sees (lo <= j - i <= hi) a key j whose k or v is not
    finite. Prefix counts of bad keys, so O(Sq + Sk), never an [Sq, Sk] mask."""
    lo, hi = (None, 0) if mask is True else (None, None) if mask is False else mask
    sk = k.shape[1]
    bad = (_bad_rows(k) | _bad_rows(v)).to(torch.int32)
    counts = torch.nn.functional.pad(bad.cumsum(1), (0, 0, 1, 0))  # [B, Sk + 1, Hkv]
    i = torch.arange(sq, device=k.device)
    start = (i + lo).clamp(0, sk) if lo is not None else torch.zeros_like(i)
    end = (i + hi + 1).clamp(0, sk) if hi is not None else torch.full_like(i, sk)
    end = torch.maximum(start, end)
    seen = (counts[:, end] - counts[:, start]) > 0  # [B, Sq, Hkv]
    return seen.repeat_interleave(hq // k.shape[2], dim=2)
