"""Fused log-sum-exp merge of partial attention results (Triton).

`merge_stacked(outs, lses)` combines N partials stacked on a leading dim in one pass:
out = sum_i exp(lse_i - lse) out_i, lse = log sum_i exp(lse_i); partials with lse = -inf
(no keys seen) contribute nothing, and a row no partial saw stays out = 0, lse = -inf.
Offsets are int64 (N x rows x D partials can pass 2^31 elements).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .configs import MERGE_BLOCK_R, block_d


@triton.jit
def _merge_kernel(OUTS, LSES, O, L, N, R, D, s_on, s_or, s_ln, s_o, BLOCK_R: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    r_ok = rows < R
    ok = r_ok[:, None] & (offs_d < D)[None, :]
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    lse_ptr = LSES + rows
    for _ in range(0, N):  # pointers step by the partial stride: no i * stride product
        m = tl.maximum(m, tl.load(lse_ptr, mask=r_ok, other=float("-inf")))
        lse_ptr += s_ln
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    tot = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    lse_ptr = LSES + rows
    out_ptr = OUTS + rows[:, None] * s_or + offs_d[None, :]
    for _ in range(0, N):
        w = tl.exp(tl.load(lse_ptr, mask=r_ok, other=float("-inf")) - m_safe)
        o = tl.load(out_ptr, mask=ok, other=0.0).to(tl.float32)
        tot += w
        acc += w[:, None] * o
        lse_ptr += s_ln
        out_ptr += s_on
    seen = tot > 0
    tl.store(O + rows[:, None] * s_o + offs_d[None, :],
             acc / tl.where(seen, tot, 1.0)[:, None], mask=ok)
    tl.store(L + rows, tl.where(seen, m_safe + tl.log(tl.where(seen, tot, 1.0)),
                                float("-inf")), mask=r_ok)


def merge_rows(outs: Tensor, lses: Tensor) -> tuple[Tensor, Tensor]:
    """outs [N, R, D], lses [N, R] (fp32 or half; any strides) -> out [R, D] fp32,
    lse [R] fp32."""
    if outs.dim() != 3 or lses.shape != outs.shape[:2]:
        raise ValueError(f"outs must be [N, R, D] and lses [N, R], got {tuple(outs.shape)} "
                         f"and {tuple(lses.shape)}")
    n, r, d = outs.shape
    if outs.stride(2) != 1:
        outs = outs.contiguous()
    if lses.dtype != torch.float32 or lses.stride(1) != 1:
        lses = lses.float().contiguous()
    out = torch.empty(r, d, dtype=torch.float32, device=outs.device)
    lse = torch.empty(r, dtype=torch.float32, device=outs.device)
    _merge_kernel[(triton.cdiv(r, MERGE_BLOCK_R),)](
        outs, lses, out, lse, n, r, d, outs.stride(0), outs.stride(1), lses.stride(0),
        out.stride(0), BLOCK_R=MERGE_BLOCK_R, BLOCK_D=block_d(d))
    return out, lse


def merge_stacked(outs: Tensor, lses: Tensor) -> tuple[Tensor, Tensor]:
    """outs [N, B, S, H, D], lses [N, B, H, S] -> (out [B, S, H, D] fp32, lse [B, H, S] fp32)."""
    n, b, s, h, d = outs.shape
    rows_o = outs.reshape(n, b * s * h, d)
    rows_l = lses.transpose(2, 3).reshape(n, b * s * h)  # (b, s, h) row order, like outs
    out, lse = merge_rows(rows_o, rows_l)
    return out.reshape(b, s, h, d), lse.reshape(b, s, h).transpose(1, 2)
