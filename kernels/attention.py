"""Flash-attention forward and backward in Triton, for one ring block.

Layering: @triton.jit kernels -> launchers -> `attention_fwd` / `attention_bwd`.

* Causal masks are given by absolute positions: key j is visible from query i iff
  k_offset + j <= q_offset + i. One kernel thus serves every ring step of every layout
  (full, diagonal, shifted diagonal, empty) and chunked prefill.
* GQA/MQA without expanding K/V: the G query heads that share a KV head are packed into the
  rows of a tile (row r = token r // G, head hk * G + r % G), so each K/V tile is loaded
  once for the whole group.
* The forward takes a key range per split, so a split-KV decode is the same kernel run with
  several splits (`decode.py`). lse is natural-log, fp32; rows that see no key get
  lse = -inf and out = 0. The backward accumulates in fp32 and returns fp32 gradients.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE,
                sqb, sqs, sqh, skb, sks, skh, svb, svs, svh,
                sop, sob, sos, soh, slp, slb, slh,
                Sq, Sk, Hkv, G, D, q_off, k_off, split_len, qk_scale,
                CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr):
    pid_m, pid_bh, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hk = pid_bh // Hkv, pid_bh % Hkv
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tok, head = rows // G, hk * G + rows % G
    row_ok = rows < Sq * G
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(Q + b * sqb + tok[:, None] * sqs + head[:, None] * sqh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo = pid_s * split_len
    hi = tl.minimum(Sk, lo + split_len)
    if CAUSAL:  # keys after the block's last query position are never visible
        last = tl.minimum((pid_m + 1) * BLOCK_M, Sq * G) - 1
        hi = tl.minimum(hi, q_off + last // G - k_off + 1)
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < hi
        k = tl.load(K + b * skb + cols[None, :] * sks + hk * skh + offs_d[:, None],
                    mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, k) * qk_scale  # log2 units
        ok = col_ok[None, :] & row_ok[:, None]
        if CAUSAL:
            ok = ok & ((k_off + cols)[None, :] <= (q_off + tok)[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * svb + cols[:, None] * svs + hk * svh + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    tl.store(O + pid_s * sop + b * sob + tok[:, None] * sos + head[:, None] * soh
             + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_s * slp + b * slb + head * slh + tok, lse, mask=row_ok)


def _block_sizes(d: int, dtype: torch.dtype) -> tuple[int, int, int]:
    block_d = max(16, triton.next_power_of_2(d))
    big = 64 if block_d <= 64 else 32
    return big, big, block_d


def split_plan(sk: int, splits: int, head_dim: int) -> tuple[int, int]:
    """(keys per split, number of splits): whole key tiles per split, no empty split."""
    bn = _block_sizes(head_dim, torch.float32)[1]
    split_len = max(1, triton.cdiv(triton.cdiv(max(sk, 1), splits), bn)) * bn
    return split_len, max(1, triton.cdiv(sk, split_len))


def _launch_fwd(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
                causal: bool, q_offset: int, k_offset: int, splits: int) -> None:
    """out: [splits, B, Sq, Hq, D] (or [B, Sq, Hq, D] when splits == 1), lse likewise;
    `splits` must come from `split_plan`."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    bm, bn, bd = _block_sizes(d, q.dtype)
    split_len, n = split_plan(sk, splits, d)
    assert n == splits, "use split_plan() to size the partial buffers"
    o4 = out if out.dim() == 5 else out.unsqueeze(0)
    l4 = lse if lse.dim() == 4 else lse.unsqueeze(0)
    grid = (triton.cdiv(sq * (hq // hkv), bm), b * hkv, splits)
    _fwd_kernel[grid](q, k, v, o4, l4,
                      q.stride(0), q.stride(1), q.stride(2),
                      k.stride(0), k.stride(1), k.stride(2),
                      v.stride(0), v.stride(1), v.stride(2),
                      o4.stride(0), o4.stride(1), o4.stride(2), o4.stride(3),
                      l4.stride(0), l4.stride(1), l4.stride(2),
                      sq, sk, hkv, hq // hkv, d, q_offset, k_offset, split_len,
                      scale * LOG2E, CAUSAL=causal, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)


def _unit_last(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool = False,
                  q_offset: int = 0, k_offset: int = 0) -> tuple[Tensor, Tensor]:
    """q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> (out [B, Sq, Hq, D] q.dtype, lse [B, Hq, Sq])."""
    q, k, v = (_unit_last(x) for x in (q, k, v))
    b, sq, hq, d = q.shape
    out = torch.empty(b, sq, hq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, hq, sq, dtype=torch.float32, device=q.device)
    _launch_fwd(q, k, v, out, lse, scale, causal, q_offset, k_offset, 1)
    return out, lse


# ---------------------------------------------------------------------------- backward
@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, sob, sos, soh, sdb, sds, sdh, H, Sq, D,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[b, h, i] = sum_d dO * O (fp32), the softmax-backward row term."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (rows < Sq)[:, None] & (offs_d < D)[None, :]
    o = tl.load(O + b * sob + rows[:, None] * sos + h * soh + offs_d[None, :], mask=ok,
                other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdb + rows[:, None] * sds + h * sdh + offs_d[None, :], mask=ok,
                 other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh * Sq + rows, tl.sum(o * do, 1), mask=rows < Sq)


@triton.jit
def _load_rows(Q, DO, LSE, DELTA, b, hk, rows, offs_d, d_ok, sqb, sqs, sqh, sdb, sds, sdh,
               slb, slh, Sq, G, H):
    """q, dO, lse, delta of packed query rows (row r = token r // G, head hk * G + r % G)."""
    tok, head = rows // G, hk * G + rows % G
    row_ok = rows < Sq * G
    ok = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + tok[:, None] * sqs + head[:, None] * sqh + offs_d[None, :],
                mask=ok, other=0.0)
    do = tl.load(DO + b * sdb + tok[:, None] * sds + head[:, None] * sdh + offs_d[None, :],
                 mask=ok, other=0.0)
    lse = tl.load(LSE + b * slb + head * slh + tok, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + (b * H + head) * Sq + tok, mask=row_ok, other=0.0)
    return q, do, lse, delta, tok, row_ok


@triton.jit
def _probs(q, k, lse, tok, cols, row_ok, col_ok, q_off, k_off, qk_scale,
           CAUSAL: tl.constexpr):
    """Softmax probabilities of a tile, recomputed from the global lse (0 where masked)."""
    s = tl.dot(q, tl.trans(k)) * qk_scale  # [M, N], log2 units
    ok = row_ok[:, None] & col_ok[None, :] & (lse != float("-inf"))[:, None]
    if CAUSAL:
        ok = ok & ((k_off + cols)[None, :] <= (q_off + tok)[:, None])
    return tl.where(ok, tl.exp2(s - lse[:, None] * 1.4426950408889634), 0.0)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                     sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdb, sds, sdh,
                     slb, slh, sgb, sgs, sgh,
                     Sq, Sk, Hkv, G, D, q_off, k_off, scale, qk_scale,
                     CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """dK, dV of one key tile, summed over every query row (all G heads) that sees it."""
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    b, hk = pid_bh // Hkv, pid_bh % Hkv
    H = Hkv * G
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < Sk
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    k = tl.load(K + b * skb + cols[:, None] * sks + hk * skh + offs_d[None, :],
                mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    v = tl.load(V + b * svb + cols[:, None] * svs + hk * svh + offs_d[None, :],
                mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    if CAUSAL:  # queries before the tile's first key position see none of it
        first_tok = tl.maximum(k_off + pid_n * BLOCK_N - q_off, 0)
        lo = (first_tok * G) // BLOCK_M * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    for start in range(lo, Sq * G, BLOCK_M):
        q, do, lse, delta, tok, row_ok = _load_rows(
            Q, DO, LSE, DELTA, b, hk, start + offs_m, offs_d, d_ok, sqb, sqs, sqh,
            sdb, sds, sdh, slb, slh, Sq, G, H)
        p = _probs(q, k, lse, tok, cols, row_ok, col_ok, q_off, k_off, qk_scale, CAUSAL)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    ptr = b * sgb + cols[:, None] * sgs + hk * sgh + offs_d[None, :]
    tl.store(DK + ptr, dk * scale, mask=col_ok[:, None] & d_ok[None, :])
    tl.store(DV + ptr, dv, mask=col_ok[:, None] & d_ok[None, :])


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                   sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdb, sds, sdh,
                   slb, slh, sgb, sgs, sgh,
                   Sq, Sk, Hkv, G, D, q_off, k_off, scale, qk_scale,
                   CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    """dQ of one tile of packed query rows, over every key it sees."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, hk = pid_bh // Hkv, pid_bh % Hkv
    H = Hkv * G
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q, do, lse, delta, tok, row_ok = _load_rows(Q, DO, LSE, DELTA, b, hk, rows, offs_d, d_ok,
                                                sqb, sqs, sqh, sdb, sds, sdh, slb, slh,
                                                Sq, G, H)
    head = hk * G + rows % G
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = Sk
    if CAUSAL:
        last = tl.minimum((pid_m + 1) * BLOCK_M, Sq * G) - 1
        hi = tl.minimum(Sk, q_off + last // G - k_off + 1)
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(0, hi, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < Sk
        k = tl.load(K + b * skb + cols[:, None] * sks + hk * skh + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(V + b * svb + cols[:, None] * svs + hk * svh + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        p = _probs(q, k, lse, tok, cols, row_ok, col_ok, q_off, k_off, qk_scale, CAUSAL)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    tl.store(DQ + b * sgb + tok[:, None] * sgs + head[:, None] * sgh + offs_d[None, :],
             dq * scale, mask=row_ok[:, None] & d_ok[None, :])


def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  scale: float, causal: bool = False, q_offset: int = 0,
                  k_offset: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (fp32) of one block given the *global* out and lse of its query rows."""
    dout, q, k, v, out = (_unit_last(x) for x in (dout, q, k, v, out))
    lse = lse.float().contiguous()
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    bm, bn, bd = _block_sizes(d, q.dtype)
    delta = torch.empty(b, hq, sq, dtype=torch.float32, device=q.device)
    _bwd_delta_kernel[(triton.cdiv(sq, bm), b * hq)](
        out, dout, delta, out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2), hq, sq, d, BLOCK_M=bm, BLOCK_D=bd)
    dq = torch.empty(b, sq, hq, d, dtype=torch.float32, device=q.device)
    dk = torch.empty(b, sk, hkv, d, dtype=torch.float32, device=q.device)
    dv = torch.empty_like(dk)
    common = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
              v.stride(0), v.stride(1), v.stride(2),
              dout.stride(0), dout.stride(1), dout.stride(2), lse.stride(0), lse.stride(1))
    tail = (sq, sk, hkv, g, d, q_offset, k_offset, scale, scale * LOG2E)
    meta = dict(CAUSAL=causal, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
    _bwd_dkdv_kernel[(triton.cdiv(sk, bn), b * hkv)](
        q, k, v, dout, lse, delta, dk, dv, *common,
        dk.stride(0), dk.stride(1), dk.stride(2), *tail, **meta)
    _bwd_dq_kernel[(triton.cdiv(sq * g, bm), b * hkv)](
        q, k, v, dout, lse, delta, dq, *common,
        dq.stride(0), dq.stride(1), dq.stride(2), *tail, **meta)
    return dq, dk, dv
