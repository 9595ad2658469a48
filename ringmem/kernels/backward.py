"""Flash-attention backward in Triton, for one ring block (forward: `attention.py`).

Three kernels: delta = rowsum(dO * O), dK/dV per key tile (summed over every query row of
the G heads that share the KV head), dQ per tile of packed query rows. Both big kernels
recompute the probabilities from the *global* lse. Gradients accumulate and return in fp32.
Offsets are int64, fp32 dots IEEE; dK/dV and dQ have their own autotune sets.

The mask is the forward's band (lo <= (k_offset + j) - (q_offset + i) <= hi, either edge
optional, `attention.py`): dQ visits only the key tiles its rows' band reaches, dK/dV only
the query tiles whose band reaches its keys (a lower edge bounds them from above, an upper
edge from below). With a softcap the logit gradient passes through the cap:
dS_raw = dS * (1 - tanh^2).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .band import Mask, _band, _key_range, _logits, band_args, scale_args
from .configs import (
    TUNE_KEY,
    Tile,
    autotune_configs,
    block_d,
    check_index_range,
    check_qkv,
    default_tile,
    dot_precision,
    interpreting,
    prune_for,
    unit_last,
    variant,
)

DELTA_BLOCK_M = 64


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, sob, sos, soh, sdb, sds, sdh, H, Sq, D,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[b, h, i] = sum_d dO * O (fp32), the softmax-backward row term."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h = pid_bh // H, pid_bh % H
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
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
    """q, dO, lse, delta of packed query rows (row r = token r // G, head hk * G + r % G);
    b and hk are int64, so every offset is; tok (int32) is for the band mask."""
    tok = rows // G
    t64, head = tok.to(tl.int64), hk * G + rows % G
    row_ok = rows < Sq * G
    ok = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + t64[:, None] * sqs + head[:, None] * sqh + offs_d[None, :],
                mask=ok, other=0.0)
    do = tl.load(DO + b * sdb + t64[:, None] * sds + head[:, None] * sdh + offs_d[None, :],
                 mask=ok, other=0.0)
    lse = tl.load(LSE + b * slb + head * slh + t64, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + (b * H + head) * Sq + t64, mask=row_ok, other=0.0)
    return q, do, lse, delta, tok, t64, head, row_ok


@triton.jit
def _probs(q, k, lse, tok, cols, row_ok, col_ok, band_lo, band_hi, qk_scale, cap,
           HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, SOFTCAP: tl.constexpr,
           PREC: tl.constexpr):
    """Softmax probabilities of a tile, recomputed from the global lse (0 where masked),
    and tanh of the capped logits (see `_logits`)."""
    s, t = _logits(tl.dot(q, tl.trans(k), input_precision=PREC), qk_scale, cap,
                   SOFTCAP)  # [M, N], log2 units
    ok = _band(row_ok[:, None] & col_ok[None, :] & (lse != float("-inf"))[:, None], cols,
               tok, band_lo, band_hi, HAS_LO, HAS_HI, False)
    return tl.where(ok, tl.exp2(s - lse[:, None] * 1.4426950408889634), 0.0), t


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                     sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdb, sds, sdh,
                     slb, slh, sgb, sgs, sgh,
                     Sq, Sk, Hkv, G, D, band_lo, band_hi, scale, qk_scale, cap,
                     HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, SOFTCAP: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     PREC: tl.constexpr):
    """dK, dV of one key tile, summed over every query row (all G heads) that sees it."""
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    b, hk = (pid_bh // Hkv).to(tl.int64), (pid_bh % Hkv).to(tl.int64)
    H = Hkv * G
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # int32 masks, int64 addresses
    c64 = cols.to(tl.int64)
    col_ok = cols < Sk
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    k = tl.load(K + b * skb + c64[:, None] * sks + hk * skh + offs_d[None, :],
                mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    v = tl.load(V + b * svb + c64[:, None] * svs + hk * svh + offs_d[None, :],
                mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    hi = Sq * G
    if HAS_HI:  # tokens before the tile's first key - band_hi see none of it
        first = tl.minimum(tl.maximum(pid_n * BLOCK_N - band_hi, 0), Sq)
        lo = (first * G) // BLOCK_M * BLOCK_M
    if HAS_LO:  # nor tokens after its last key - band_lo (bounded first: no overflow)
        last_key = tl.minimum((pid_n + 1) * BLOCK_N, Sk) - 1
        hi = tl.minimum(last_key - band_lo + 1, Sq) * G
    # transposed formulation (keys x rows): p^T and dS^T come out of the dots in the layout
    # the next dots take, no register transposes (fewer registers, no spills)
    offs_m = tl.arange(0, BLOCK_M)
    for start in range(lo, hi, BLOCK_M):
        rows = start + offs_m
        tok = rows // G
        t64, head = tok.to(tl.int64), hk * G + rows % G
        row_ok = rows < Sq * G
        q_t = tl.load(Q + b * sqb + t64[None, :] * sqs + head[None, :] * sqh + offs_d[:, None],
                      mask=row_ok[None, :] & d_ok[:, None], other=0.0)  # [D, M]
        do = tl.load(DO + b * sdb + t64[:, None] * sds + head[:, None] * sdh + offs_d[None, :],
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        lse = tl.load(LSE + b * slb + head * slh + t64, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + (b * H + head) * Sq + t64, mask=row_ok, other=0.0)
        s_t, t_t = _logits(tl.dot(k, q_t, input_precision=PREC), qk_scale, cap,
                           SOFTCAP)  # [N, M], log2 units
        ok = _band(col_ok[:, None] & row_ok[None, :] & (lse != float("-inf"))[None, :],
                   cols, tok, band_lo, band_hi, HAS_LO, HAS_HI, True)
        p_t = tl.where(ok, tl.exp2(s_t - lse[None, :] * 1.4426950408889634), 0.0)
        pd_t = p_t  # dS = p (dp - delta), times the cap's derivative (1 - tanh^2) taken
        if SOFTCAP:  # now: t_t then dies before the dots (2.4x the registers otherwise)
            pd_t = p_t * (1.0 - t_t * t_t)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
        ds_t = pd_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=PREC)
    ptr = b * sgb + c64[:, None] * sgs + hk * sgh + offs_d[None, :]
    tl.store(DK + ptr, dk * scale, mask=col_ok[:, None] & d_ok[None, :])
    tl.store(DV + ptr, dv, mask=col_ok[:, None] & d_ok[None, :])


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                   sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdb, sds, sdh,
                   slb, slh, sgb, sgs, sgh,
                   Sq, Sk, Hkv, G, D, band_lo, band_hi, scale, qk_scale, cap,
                   HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, SOFTCAP: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   PREC: tl.constexpr):
    """dQ of one tile of packed query rows, over every key it sees."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, hk = (pid_bh // Hkv).to(tl.int64), (pid_bh % Hkv).to(tl.int64)
    H = Hkv * G
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q, do, lse, delta, tok, t64, head, row_ok = _load_rows(
        Q, DO, LSE, DELTA, b, hk, rows, offs_d, d_ok, sqb, sqs, sqh, sdb, sds, sdh, slb, slh,
        Sq, G, H)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _key_range(0, Sk, (pid_m * BLOCK_M) // G,
                        (tl.minimum((pid_m + 1) * BLOCK_M, Sq * G) - 1) // G, band_lo,
                        band_hi, HAS_LO, HAS_HI, BLOCK_N)
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        c64 = cols.to(tl.int64)
        col_ok = cols < Sk
        k = tl.load(K + b * skb + c64[:, None] * sks + hk * skh + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(V + b * svb + c64[:, None] * svs + hk * svh + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        p, t = _probs(q, k, lse, tok, cols, row_ok, col_ok, band_lo, band_hi, qk_scale, cap,
                      HAS_LO, HAS_HI, SOFTCAP, PREC)
        if SOFTCAP:  # through softcap * tanh(s / softcap); t dies before the dot
            p = p * (1.0 - t * t)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    tl.store(DQ + b * sgb + t64[:, None] * sgs + head[:, None] * sgh + offs_d[None, :],
             dq * scale, mask=row_ok[:, None] & d_ok[None, :])


_dkdv_tuned = triton.autotune(configs=autotune_configs("dkdv"), key=TUNE_KEY,
                              prune_configs_by={"early_config_prune": prune_for("dkdv", "Q")}
                              )(_bwd_dkdv_kernel)
_dq_tuned = triton.autotune(configs=autotune_configs("dq"), key=TUNE_KEY,
                            prune_configs_by={"early_config_prune": prune_for("dq", "Q")}
                            )(_bwd_dq_kernel)


def _launch_grad(kernel: str, args: tuple, n_rows: int, rows_block: str, n_prog: int,
                 meta: dict, tile: Tile | None, dtype: torch.dtype) -> None:
    """One of the two gradient kernels: autotuned, or the given / default tile; the grid
    is n_rows / rows_block (BLOCK_N for dK/dV, BLOCK_M for dQ) x n_prog."""
    raw, tuned = {"dkdv": (_bwd_dkdv_kernel, _dkdv_tuned), "dq": (_bwd_dq_kernel, _dq_tuned)}[
        kernel]
    if tile is None and interpreting():
        tile = default_tile(kernel, meta["BLOCK_D"], dtype,
                            variant(meta["HAS_LO"], meta["SOFTCAP"]))
    if tile is None:
        tuned[lambda m: (triton.cdiv(n_rows, m[rows_block]), n_prog)](*args, **meta)
    else:
        t = tile.meta()
        raw[(triton.cdiv(n_rows, t[rows_block]), n_prog)](*args, **meta, **t)


def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  scale: float, causal: Mask = False, q_offset: int = 0,
                  k_offset: int = 0, *, softcap: float = 0.0, dkdv_tile: Tile | None = None,
                  dq_tile: Tile | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (fp32) of one block given the *global* out and lse of its query rows;
    mask and softcap as in `attention_fwd`. `dkdv_tile` / `dq_tile` force launch
    configurations (default: autotuned)."""
    check_qkv(q, k, v)
    if dout.shape != q.shape or out.shape != q.shape:
        raise ValueError(f"dout {tuple(dout.shape)} and out {tuple(out.shape)} must match q "
                         f"{tuple(q.shape)}")
    dout, q, k, v, out = (unit_last(x) for x in (dout, q, k, v, out))
    lse = lse.float().contiguous()
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    check_index_range("Sq * Hq", sq * hq)
    check_index_range("Sk", sk)
    g, bd = hq // hkv, block_d(d)
    delta = torch.empty(b, hq, sq, dtype=torch.float32, device=q.device)
    _bwd_delta_kernel[(triton.cdiv(sq, DELTA_BLOCK_M), b * hq)](
        out, dout, delta, out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2), hq, sq, d, BLOCK_M=DELTA_BLOCK_M,
        BLOCK_D=bd)
    dq = torch.empty(b, sq, hq, d, dtype=torch.float32, device=q.device)
    dk = torch.empty(b, sk, hkv, d, dtype=torch.float32, device=q.device)
    dv = torch.empty_like(dk)
    common = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
              v.stride(0), v.stride(1), v.stride(2),
              dout.stride(0), dout.stride(1), dout.stride(2), lse.stride(0), lse.stride(1))
    has_lo, band_lo, has_hi, band_hi = band_args(causal, q_offset, k_offset, sq, sk)
    qk_scale, cap, capped = scale_args(scale, softcap)
    tail = (sq, sk, hkv, g, d, band_lo, band_hi, scale, qk_scale, cap)
    meta = dict(HAS_LO=has_lo, HAS_HI=has_hi, SOFTCAP=capped, BLOCK_D=bd,
                PREC=dot_precision(q.dtype))
    _launch_grad("dkdv", (q, k, v, dout, lse, delta, dk, dv, *common, dk.stride(0),
                          dk.stride(1), dk.stride(2), *tail), sk, "BLOCK_N", b * hkv, meta,
                 dkdv_tile, q.dtype)
    _launch_grad("dq", (q, k, v, dout, lse, delta, dq, *common, dq.stride(0), dq.stride(1),
                        dq.stride(2), *tail), sq * g, "BLOCK_M", b * hkv, meta, dq_tile,
                 q.dtype)
    return dq, dk, dv
