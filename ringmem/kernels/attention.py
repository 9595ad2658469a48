"""Flash-attention forward in Triton, for one ring block (backward: `backward.py`).

Layering: @triton.jit kernels -> launchers -> `attention_fwd`.

* Masks are bands on absolute positions: key j is visible from query i iff
  lo <= (k_offset + j) - (q_offset + i) <= hi, either edge optional (None). Causal is
  (None, 0), full (None, None); a sliding window piece has both. One kernel thus serves
  every ring step of every layout (full, diagonal, shifted diagonal, window band, empty)
  and chunked prefill. The host folds the offsets into the edges (`band.band_args`);
  constexpr flags HAS_LO / HAS_HI compile only the edges that exist, and key tiles wholly
  outside the band on either side are never visited.
* Logit softcap (Gemma 2, constexpr SOFTCAP): s = softcap * tanh(scale * q.k / softcap),
  before the mask; without it the kernels are the plain ones.
* GQA/MQA without expanding K/V: the G query heads that share a KV head are packed into the
  rows of a tile (row r = token r // G, head hk * G + r % G), so each K/V tile is loaded
  once for the whole group.
* The forward takes a key range per split, so a split-KV decode is the same kernel run with
  several splits (`decode.py`). lse is natural-log, fp32; rows that see no key (outside
  the band, or past the block) get lse = -inf and out = 0.
* Offsets into memory are int64 (a 1M x 32 x 128 q has 2^32 elements); row and key
  indices stay int32. fp32 dots are IEEE (`PREC`), never TF32.
* Tiles are autotuned per (arch, head dim, dtype, band edges, softcap) from
  `configs.TILES`; under the interpreter the default tile runs, and `tile=` forces one
  (tests run each).
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


@triton.jit
def _attend(m_i, l_i, acc, q, K, V, sks, svs, offs_d, d_ok, tok, row_ok, lo, hi, band_lo,
            band_hi, qk_scale, cap, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
            SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    """Online softmax state (m, l, acc; log2 units, fp32) of q's rows carried over keys
    [lo, hi) of K/V (pointers at key 0 of the right batch and head), band on j - tok."""
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n  # int32 for the masks (fewer registers), int64 for addresses
        col_ok = cols < hi
        c64 = cols.to(tl.int64)
        k = tl.load(K + c64[None, :] * sks + offs_d[:, None],
                    mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        s, _ = _logits(tl.dot(q, k, input_precision=PREC), qk_scale, cap, SOFTCAP)
        ok = _band(col_ok[None, :] & row_ok[:, None], cols, tok, band_lo, band_hi, HAS_LO,
                   HAS_HI, False)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + c64[:, None] * svs + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _finish(m_i, l_i, acc):
    """(out, natural-log lse) of an online softmax; rows that saw no key: 0 and -inf."""
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    return out, lse


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE,
                sqb, sqs, sqh, skb, sks, skh, svb, svs, svh,
                sop, sob, sos, soh, slp, slb, slh,
                Sq, Sk, Hkv, G, D, band_lo, band_hi, split_len, qk_scale, cap,
                HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, SOFTCAP: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                PREC: tl.constexpr):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    pid_s = tl.program_id(2).to(tl.int64)
    b, hk = (pid_bh // Hkv).to(tl.int64), (pid_bh % Hkv).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = rows // G  # int32 for the band mask, int64 (t64) for addresses
    t64, head = tok.to(tl.int64), hk * G + rows % G
    row_ok = rows < Sq * G
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(Q + b * sqb + t64[:, None] * sqs + head[:, None] * sqh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    lo = tl.program_id(2) * split_len
    # keys outside the band of every token of the tile are never visited
    lo, hi = _key_range(lo, tl.minimum(Sk, lo + split_len), (pid_m * BLOCK_M) // G,
                        (tl.minimum((pid_m + 1) * BLOCK_M, Sq * G) - 1) // G, band_lo,
                        band_hi, HAS_LO, HAS_HI, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m_i, l_i, acc = _attend(m_i, l_i, acc, q, K + b * skb + hk * skh, V + b * svb + hk * svh,
                            sks, svs, offs_d, d_ok, tok, row_ok, lo, hi, band_lo, band_hi,
                            qk_scale, cap, HAS_LO, HAS_HI, SOFTCAP, BLOCK_N, PREC)
    out, lse = _finish(m_i, l_i, acc)
    tl.store(O + pid_s * sop + b * sob + t64[:, None] * sos + head[:, None] * soh
             + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_s * slp + b * slb + head * slh + t64, lse, mask=row_ok)


_fwd_tuned = triton.autotune(configs=autotune_configs("fwd"), key=TUNE_KEY,
                             prune_configs_by={"early_config_prune": prune_for("fwd", "Q")}
                             )(_fwd_kernel)


def _launch_fwd(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
                causal: Mask, q_offset: int, k_offset: int, split_len: int | None = None,
                tile: Tile | None = None, softcap: float = 0.0) -> None:
    """out: [splits, B, Sq, Hq, D] (or [B, Sq, Hq, D], one split), lse [splits, B, Hq, Sq]
    likewise. Split p covers keys [p * split_len, (p + 1) * split_len); `tile=None`
    autotunes (one split only: splits are cut in whole tiles of a known BLOCK_N)."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    check_index_range("Sq * Hq", sq * hq)
    check_index_range("Sk", sk)
    o5 = out if out.dim() == 5 else out.unsqueeze(0)
    l4 = lse if lse.dim() == 4 else lse.unsqueeze(0)
    splits = o5.shape[0]
    split_len = max(sk, 1) if split_len is None else split_len
    assert triton.cdiv(max(sk, 1), split_len) == splits, "use split_plan() to size partials"
    assert splits == 1 or tile is not None, "split-KV needs a fixed tile"
    bd = block_d(d)
    has_lo, band_lo, has_hi, band_hi = band_args(causal, q_offset, k_offset, sq, sk)
    qk_scale, cap, capped = scale_args(scale, softcap)
    if tile is None and interpreting():
        tile = default_tile("fwd", bd, q.dtype, variant(has_lo, capped))
    args = (q, k, v, o5, l4, q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            o5.stride(0), o5.stride(1), o5.stride(2), o5.stride(3),
            l4.stride(0), l4.stride(1), l4.stride(2),
            sq, sk, hkv, hq // hkv, d, band_lo, band_hi, split_len, qk_scale, cap)
    meta = dict(HAS_LO=has_lo, HAS_HI=has_hi, SOFTCAP=capped, BLOCK_D=bd,
                PREC=dot_precision(q.dtype))
    rows = sq * (hq // hkv)
    if tile is None:
        grid = lambda m: (triton.cdiv(rows, m["BLOCK_M"]), b * hkv, splits)
        _fwd_tuned[grid](*args, **meta)
    else:
        _fwd_kernel[(triton.cdiv(rows, tile.block_m), b * hkv, splits)](
            *args, **meta, **tile.meta())


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: Mask = False,
                  q_offset: int = 0, k_offset: int = 0, *, softcap: float = 0.0,
                  tile: Tile | None = None) -> tuple[Tensor, Tensor]:
    """q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> (out [B, Sq, Hq, D] q.dtype, lse [B, Hq, Sq]).
    `causal`: True / False or a band (lo, hi) on (k_offset + j) - (q_offset + i);
    `softcap` > 0 caps the logits; `tile` forces one launch configuration (default:
    autotuned)."""
    check_qkv(q, k, v)
    q, k, v = (unit_last(x) for x in (q, k, v))
    b, sq, hq, d = q.shape
    out = torch.empty(b, sq, hq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, hq, sq, dtype=torch.float32, device=q.device)
    _launch_fwd(q, k, v, out, lse, scale, causal, q_offset, k_offset, tile=tile,
                softcap=softcap)
    return out, lse



__all__ = ["attention_fwd"]
