"""Split-KV decode (flash-decoding) in Triton: a few query tokens against a long K/V shard.

* `decode_partial`: q [B, Sq, Hq, D] against contiguous k/v [B, Sk, Hkv, D]; the forward
  kernel of `attention.py` runs once per KV split.
* `decode_runs`: one query token q [Hq, D] against a paged pool k/v [Hkv, slots, D], its
  keys a list of slot ranges (runs). The host cuts the runs into a split table of whole key
  tiles (no device data is read, so nothing syncs); one launch reads every run in place.

Both pack the G query heads of each KV head into the tile rows (K/V read once per group),
write fp32 partials per split, and combine them with the fused merge of `merge.py`. Tiles
are fixed per head dim (`configs.DECODE_TILES`), never autotuned: the splits must be whole
tiles of a BLOCK_N the host knows before launch.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .attention import _attend, _finish, _launch_fwd, check_qkv
from .configs import (LOG2E, Tile, block_d, check_index_range, decode_tile, dot_precision,
                      unit_last)
from .merge import merge_rows, merge_stacked

MIN_SPLIT_KEYS = 512  # fewer keys per program and the merge costs more than it saves


def default_splits(b: int, hkv: int, sk: int, device: torch.device) -> int:
    """Enough programs to fill the device, each with at least MIN_SPLIT_KEYS keys."""
    sms = (torch.cuda.get_device_properties(device).multi_processor_count
           if device.type == "cuda" else 4)
    return max(1, min(triton.cdiv(2 * sms, b * hkv), triton.cdiv(sk, MIN_SPLIT_KEYS)))


def split_plan(sk: int, splits: int, head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """(keys per split, number of splits): whole decode key tiles per split, none empty."""
    bn = decode_tile(block_d(head_dim), 1, dtype).block_n
    split_len = max(1, triton.cdiv(triton.cdiv(max(sk, 1), splits), bn)) * bn
    return split_len, max(1, triton.cdiv(sk, split_len))


def decode_partial(q: Tensor, k: Tensor, v: Tensor, scale: float,
                   num_splits: int | None = None) -> tuple[Tensor, Tensor]:
    """q [B, Sq, Hq, D] (Sq small), k/v [B, Sk, Hkv, D], non-causal ->
    (out [B, Sq, Hq, D] fp32, lse [B, Hq, Sq] fp32)."""
    check_qkv(q, k, v)
    q, k, v = (unit_last(x) for x in (q, k, v))
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    split_len, splits = split_plan(sk, num_splits or default_splits(b, hkv, sk, q.device), d,
                                   q.dtype)
    outs = torch.empty(splits, b, sq, hq, d, dtype=torch.float32, device=q.device)
    lses = torch.empty(splits, b, hq, sq, dtype=torch.float32, device=q.device)
    tile = decode_tile(block_d(d), sq * (hq // hkv), q.dtype)
    _launch_fwd(q, k, v, outs, lses, scale, False, 0, 0, split_len, tile)
    if splits == 1:
        return outs[0], lses[0]
    return merge_stacked(outs, lses)


# ------------------------------------------------------------------ paged run-list decode
@triton.jit
def _runs_kernel(Q, K, V, SPLITS, O, LSE, sqh, skh, sks, svh, svs, sop, soh, slp, G, D,
                 qk_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """Split p (keys [lo, hi) of one run) x KV head hk x block of its G query heads."""
    pid_p, hk = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < G
    head = hk * G + rows
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(Q + head[:, None] * sqh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    lo = tl.load(SPLITS + 2 * pid_p).to(tl.int32)  # slots < 2^31 (checked on the host)
    hi = tl.load(SPLITS + 2 * pid_p + 1).to(tl.int32)
    m_i, l_i, acc = _attend(q, K + hk * skh, V + hk * svh, sks, svs, offs_d, d_ok, rows,
                            row_ok, lo, hi, 0, 0, qk_scale, False, BLOCK_M, BLOCK_N,
                            BLOCK_D, PREC)
    out, lse = _finish(m_i, l_i, acc)
    tl.store(O + pid_p * sop + head[:, None] * soh + offs_d[None, :], out,
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_p * slp + head, lse, mask=row_ok)


def check_runs(runs: Sequence[tuple[int, int]], slots: int) -> list[tuple[int, int]]:
    """The non-empty runs, each 0 <= lo < hi <= slots."""
    out = []
    for run in runs:
        if len(run) != 2:
            raise ValueError(f"runs must hold (lo, hi) pairs, got {run!r}")
        lo, hi = int(run[0]), int(run[1])
        if not 0 <= lo <= hi <= slots:
            raise ValueError(f"runs must satisfy 0 <= lo <= hi <= slots ({slots}), got "
                             f"({lo}, {hi})")
        if hi > lo:
            out.append((lo, hi))
    return out


def split_runs(runs: Sequence[tuple[int, int]], splits: int,
               block_n: int) -> list[tuple[int, int]]:
    """Cut runs into about `splits` key ranges of whole BLOCK_N tiles (a run's last range
    may be shorter); every range lies inside one run."""
    total = sum(hi - lo for lo, hi in runs)
    split_len = max(1, triton.cdiv(triton.cdiv(max(total, 1), splits), block_n)) * block_n
    return [(s, min(s + split_len, hi)) for lo, hi in runs for s in range(lo, hi, split_len)]


def split_table(runs: Sequence[tuple[int, int]], splits: int, block_n: int,
                device: torch.device) -> Tensor:
    """The split table [P, 2] int64 on `device`, built on the host and copied without a
    sync (from pinned memory on CUDA)."""
    host = torch.tensor(split_runs(runs, splits, block_n), dtype=torch.int64).view(-1, 2)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _launch_runs(q: Tensor, k: Tensor, v: Tensor, table: Tensor, scale: float,
                 tile: Tile) -> tuple[Tensor, Tensor]:
    """Partials (outs [P, Hq, D], lses [P, Hq], fp32) of the P ranges in `table`."""
    hq, d = q.shape
    hkv, p = k.shape[0], table.shape[0]
    g = hq // hkv
    outs = torch.empty(p, hq, d, dtype=torch.float32, device=q.device)
    lses = torch.empty(p, hq, dtype=torch.float32, device=q.device)
    _runs_kernel[(p, hkv, triton.cdiv(g, tile.block_m))](
        q, k, v, table, outs, lses, q.stride(0), k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), outs.stride(0), outs.stride(1), lses.stride(0), g, d, scale * LOG2E,
        BLOCK_D=block_d(d), PREC=dot_precision(q.dtype), **tile.meta())
    return outs, lses


def _check_pools(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 2:
        raise ValueError(f"q must be [Hq, D], got shape {tuple(q.shape)}")
    if k.dim() != 3 or k.shape != v.shape or k.shape[2] != q.shape[1]:
        raise ValueError(f"k_pool/v_pool must be [Hkv, slots, D] with q's D, got "
                         f"{tuple(k.shape)}, {tuple(v.shape)} for q {tuple(q.shape)}")
    if q.shape[0] % k.shape[0]:
        raise ValueError(f"q heads ({q.shape[0]}) must be a multiple of pool heads "
                         f"({k.shape[0]})")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k_pool, v_pool must share a dtype, got {q.dtype}, {k.dtype}, "
                        f"{v.dtype}")


def decode_runs(q: Tensor, k_pool: Tensor, v_pool: Tensor, runs: Sequence[tuple[int, int]],
                scale: float, num_splits: int | None = None) -> tuple[Tensor, Tensor]:
    """One query token q [Hq, D] against slots `runs` [(lo, hi), ...] of the pools
    k_pool, v_pool [Hkv, slots, D] (GQA: head h reads KV head h // (Hq // Hkv)), in one
    split-KV launch plus the fused merge -> (out [Hq, D] fp32, lse [Hq] fp32); no keys
    (empty runs) gives out = 0, lse = -inf. `num_splits` overrides the split count target.
    """
    _check_pools(q, k_pool, v_pool)
    q, k_pool, v_pool = (unit_last(x) for x in (q, k_pool, v_pool))
    check_index_range("slots", k_pool.shape[1])
    runs = check_runs(runs, k_pool.shape[1])
    hq, d = q.shape
    if not runs:
        return (torch.zeros(hq, d, dtype=torch.float32, device=q.device),
                torch.full((hq,), float("-inf"), dtype=torch.float32, device=q.device))
    hkv = k_pool.shape[0]
    total = sum(hi - lo for lo, hi in runs)
    tile = decode_tile(block_d(d), hq // hkv, q.dtype)
    splits = num_splits or default_splits(1, hkv, total, q.device)
    table = split_table(runs, splits, tile.block_n, q.device)
    outs, lses = _launch_runs(q, k_pool, v_pool, table, scale, tile)
    if outs.shape[0] == 1:
        return outs[0], lses[0]
    return merge_rows(outs, lses)
