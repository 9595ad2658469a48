"""Split-KV decode (flash-decoding) in Triton: a few query tokens against a long K/V shard.

* `decode_partial`: q [B, Sq, Hq, D] against contiguous k/v [B, Sk, Hkv, D]; the forward
  kernel of `attention.py` runs once per KV split.
* `decode_runs`: one query token q [Hq, D] against a paged pool k/v [Hkv, slots, D], its
  keys a list of slot ranges (runs). The host splits the keys (in run order) into about as
  many splits as fill the GPU, each whole key tiles, as a table of ranges per split (no
  device data is read, so nothing syncs); one launch reads every run in place, a program
  walking its split's ranges, so thousands of short runs still make few partials.

Both pack the G query heads of each KV head into the tile rows (K/V read once per group),
write fp32 partials per split, and combine them with the fused merge of `merge.py`. Tiles
are fixed per head dim and dtype (`configs.DECODE_TILES`), never autotuned: the splits must
be whole tiles of a BLOCK_N the host knows before launch.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .attention import _attend, _finish, _launch_fwd
from .configs import (
    LOG2E,
    Tile,
    block_d,
    check_index_range,
    check_qkv,
    decode_tile,
    dot_precision,
    unit_last,
)
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
def _runs_kernel(Q, K, V, RANGES, STARTS, O, LSE, sqh, skh, sks, svh, svs, sop, soh, slp, G, D,
                 qk_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """Split p (key ranges STARTS[p] .. STARTS[p + 1] of the table, each inside one run)
    x KV head hk x block of its G query heads."""
    pid_p, hk = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < G
    head = hk * G + rows
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(Q + head[:, None] * sqh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    first, last = tl.load(STARTS + pid_p), tl.load(STARTS + pid_p + 1)
    for r in range(first, last):
        lo = tl.load(RANGES + 2 * r).to(tl.int32)  # slots < 2^31 (checked on the host)
        hi = tl.load(RANGES + 2 * r + 1).to(tl.int32)
        m_i, l_i, acc = _attend(m_i, l_i, acc, q, K + hk * skh, V + hk * svh, sks, svs,
                                offs_d, d_ok, rows, row_ok, lo, hi, 0, 0, qk_scale, 1.0,
                                False, False, False, BLOCK_N, PREC)
    out, lse = _finish(m_i, l_i, acc)
    tl.store(O + pid_p * sop + head[:, None] * soh + offs_d[None, :], out,
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_p * slp + head, lse, mask=row_ok)


def runs_tensor(runs: Sequence[tuple[int, int]] | Tensor, slots: int) -> Tensor:
    """The non-empty runs as a host [R, 2] int64 tensor, each 0 <= lo < hi <= slots
    (vectorised: a long context has thousands of runs)."""
    try:
        t = torch.as_tensor(runs, dtype=torch.int64, device="cpu").reshape(-1, 2)
    except (ValueError, TypeError, RuntimeError) as e:
        raise ValueError(f"runs must hold (lo, hi) pairs of ints: {e}") from None
    lo, hi = t[:, 0], t[:, 1]
    bad = ((lo < 0) | (hi < lo) | (hi > slots)).nonzero()
    if len(bad):
        run = tuple(t[int(bad[0, 0])].tolist())
        raise ValueError(f"runs must satisfy 0 <= lo <= hi <= slots ({slots}), got {run}")
    return t[hi > lo]


def split_runs(runs: Tensor, splits: int, block_n: int) -> tuple[Tensor, Tensor]:
    """Split host runs [R, 2] by key position (the concatenation of the runs) into about
    `splits` splits of whole BLOCK_N tiles (the last may be shorter) -> (ranges [Q, 2]:
    the runs cut at split boundaries, each inside one run and one split, in key order;
    starts [P + 1]: split p owns ranges[starts[p]:starts[p + 1]], none empty)."""
    lens = runs[:, 1] - runs[:, 0]
    total = int(lens.sum())
    split_len = max(1, triton.cdiv(triton.cdiv(max(total, 1), splits), block_n)) * block_n
    first_key = torch.cumsum(lens, 0) - lens  # key position of each run's first slot
    first_split = first_key // split_len
    pieces = (first_key + lens + split_len - 1) // split_len - first_split
    run_of = torch.repeat_interleave(torch.arange(len(runs)), pieces)
    piece = torch.arange(len(run_of)) - (torch.cumsum(pieces, 0) - pieces)[run_of]
    split = first_split[run_of] + piece
    key_lo = torch.maximum(first_key[run_of], split * split_len)
    key_hi = torch.minimum((first_key + lens)[run_of], (split + 1) * split_len)
    lo = runs[run_of, 0] + key_lo - first_key[run_of]
    ranges = torch.stack([lo, lo + key_hi - key_lo], 1)
    counts = torch.bincount(split, minlength=triton.cdiv(max(total, 1), split_len))
    return ranges, torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


def split_table(runs: Tensor, splits: int, block_n: int,
                device: torch.device) -> tuple[Tensor, Tensor]:
    """`split_runs` on `device`: built on the host and copied without a sync (from pinned
    memory on CUDA)."""
    ranges, starts = split_runs(runs, splits, block_n)
    if device.type == "cuda":
        return tuple(x.pin_memory().to(device, non_blocking=True) for x in (ranges, starts))
    return ranges.to(device), starts.to(device)


def _launch_runs(q: Tensor, k: Tensor, v: Tensor, ranges: Tensor, starts: Tensor,
                 scale: float, tile: Tile) -> tuple[Tensor, Tensor]:
    """Partials (outs [P, Hq, D], lses [P, Hq], fp32) of the P splits of `split_runs`."""
    hq, d = q.shape
    hkv, p = k.shape[0], starts.shape[0] - 1
    g = hq // hkv
    outs = torch.empty(p, hq, d, dtype=torch.float32, device=q.device)
    lses = torch.empty(p, hq, dtype=torch.float32, device=q.device)
    _runs_kernel[(p, hkv, triton.cdiv(g, tile.block_m))](
        q, k, v, ranges, starts, outs, lses, q.stride(0), k.stride(0), k.stride(1), v.stride(0),
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


def decode_runs(q: Tensor, k_pool: Tensor, v_pool: Tensor,
                runs: Sequence[tuple[int, int]] | Tensor, scale: float,
                num_splits: int | None = None) -> tuple[Tensor, Tensor]:
    """One query token q [Hq, D] against slots `runs` [(lo, hi), ...] (host data: a list or
    a CPU [R, 2] tensor) of the pools
    k_pool, v_pool [Hkv, slots, D] (GQA: head h reads KV head h // (Hq // Hkv)), in one
    split-KV launch plus the fused merge -> (out [Hq, D] fp32, lse [Hq] fp32); no keys
    (empty runs) gives out = 0, lse = -inf. `num_splits` overrides the split count target.
    """
    _check_pools(q, k_pool, v_pool)
    q, k_pool, v_pool = (unit_last(x) for x in (q, k_pool, v_pool))
    check_index_range("slots", k_pool.shape[1])
    runs = runs_tensor(runs, k_pool.shape[1])
    hq, d = q.shape
    if not len(runs):
        return (torch.zeros(hq, d, dtype=torch.float32, device=q.device),
                torch.full((hq,), float("-inf"), dtype=torch.float32, device=q.device))
    hkv = k_pool.shape[0]
    total = int((runs[:, 1] - runs[:, 0]).sum())
    tile = decode_tile(block_d(d), hq // hkv, q.dtype)
    splits = num_splits or default_splits(1, hkv, total, q.device)
    ranges, starts = split_table(runs, splits, tile.block_n, q.device)
    outs, lses = _launch_runs(q, k_pool, v_pool, ranges, starts, scale, tile)
    if outs.shape[0] == 1:
        return outs[0], lses[0]
    return merge_rows(outs, lses)
