"""The mask band and the logit softcap of the attention kernels, shared by the forward
(`attention.py`) and the backward (`backward.py`).

A block's mask is a band on absolute positions: key j is visible from query i iff
lo <= (k_offset + j) - (q_offset + i) <= hi, None for an unbounded edge (causal: (None, 0),
full: (None, None), a sliding-window piece: both edges, `ringmem.masking`). The host folds
the offsets into the edges (`band_args`), so the kernels compare local indices j - i only;
constexpr flags HAS_LO / HAS_HI compile just the edges that exist, which keeps the full and
causal kernels what they were. SOFTCAP (Gemma 2) caps the logits as
softcap * tanh(scale * q.k / softcap) before the mask.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .configs import LOG2E, check_index_range

Mask = bool | tuple[int | None, int | None]  # causal flag, or a band (lo, hi)


@triton.jit
def _tanh(x):
    """tanh, accurate to a few fp32 ulps (no libdevice: the interpreter lacks it). Below
    |x| = 0.2, where 1 - exp(-2|x|) would cancel (Gemma's softcap 50 keeps most logits
    there), an odd Taylor series to x^9 (the first term left out is < 1e-9 relative);
    above, (1 - e) / (1 + e) with e = exp(-2|x|), whose 1 - e is exact (e >= 1/2) or
    well-conditioned."""
    a = tl.abs(x)
    e = tl.exp2(a * -2.8853900817779268)  # exp(-2|x|)
    big = (1.0 - e) / (1.0 + e)
    x2 = a * a
    small = a * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
        -0.05396825396825397 + x2 * 0.021869488536155203))))
    t = tl.where(a < 0.2, small, big)
    return tl.where(x < 0, -t, t)


@triton.jit
def _logits(qk, qk_scale, cap, SOFTCAP: tl.constexpr):
    """(logits in log2 units, tanh of the capped logit) of raw dots q.k. With SOFTCAP,
    qk_scale = scale / softcap and cap = softcap * log2(e); else qk_scale = scale * log2(e)
    and the second value is the first (unused, compiled away)."""
    t = qk * qk_scale
    s = t
    if SOFTCAP:
        t = _tanh(t)
        s = t * cap
    return s, t


@triton.jit
def _band(ok, cols, tok, lo, hi, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
          KEYS_FIRST: tl.constexpr):
    """ok where lo <= j - i <= hi for key j in cols ([N]) and query token i in tok ([M]),
    ok being [M, N] (or [N, M] with KEYS_FIRST); only the edges that exist. The edges
    shift the key vector, as the offsets did before bands (ptxas allocates registers
    differently for other forms: one causal tile set spilled)."""
    if HAS_LO:
        c = cols - lo
        if KEYS_FIRST:
            ok = ok & (c[:, None] >= tok[None, :])
        else:
            ok = ok & (c[None, :] >= tok[:, None])
    if HAS_HI:
        c = cols - hi
        if KEYS_FIRST:
            ok = ok & (c[:, None] <= tok[None, :])
        else:
            ok = ok & (c[None, :] <= tok[:, None])
    return ok


@triton.jit
def _key_range(lo, hi, t_first, t_last, band_lo, band_hi, HAS_LO: tl.constexpr,
               HAS_HI: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys [lo, hi) narrowed to those query tokens t_first..t_last can see: tiles wholly
    outside the band are never visited. The lower bound stays on a key-tile boundary (lo
    itself is one: 0, or a split start of whole tiles), so loads stay aligned."""
    if HAS_LO:
        lo = tl.maximum(lo, t_first + band_lo) // BLOCK_N * BLOCK_N
    if HAS_HI:
        hi = tl.minimum(hi, t_last + band_hi + 1)
    return lo, hi


def scale_args(scale: float, softcap: float) -> tuple[float, float, bool]:
    """(qk_scale, cap, SOFTCAP) of the kernels (see `_logits`)."""
    if softcap < 0:
        raise ValueError(f"softcap must be >= 0 (0: none), got {softcap}")
    if softcap:
        return scale / softcap, softcap * LOG2E, True
    return scale * LOG2E, 1.0, False


def band_args(mask: bool | tuple[int | None, int | None], q_offset: int, k_offset: int,
              sq: int, sk: int) -> tuple[bool, int, bool, int]:
    """(HAS_LO, lo, HAS_HI, hi) of a block: key j visible from query i iff lo <= j - i <= hi
    in local indices, for the mask lo' <= (k_offset + j) - (q_offset + i) <= hi' (True:
    causal (None, 0), False: full (None, None), None: unbounded). The offsets fold into the
    edges on the host (no int32 position sums in the kernels); an edge no (i, j) of the
    block can cross is dropped (a cheaper variant), and the others are clamped to the
    block, so every value fits int32 whatever the offsets."""
    band = ((None, 0) if mask else (None, None)) if isinstance(mask, bool) else tuple(mask)
    if len(band) != 2:
        raise ValueError(f"mask must be a bool or a (lo, hi) band, got {mask!r}")
    check_index_range("Sq + Sk", sq + sk)  # tile bounds add a query and a key index
    shift = q_offset - k_offset
    lo = None if band[0] is None else int(band[0]) + shift
    hi = None if band[1] is None else int(band[1]) + shift
    if lo is not None and lo <= 1 - sq:  # j - i >= 1 - Sq always
        lo = None
    if hi is not None and hi >= sk - 1:  # j - i <= Sk - 1 always
        hi = None
    # an edge that empties the block stays an edge, clamped (j - i in [1 - Sq, Sk - 1])
    lo = None if lo is None else min(lo, sk)
    hi = None if hi is None else max(hi, -sq)
    return lo is not None, lo or 0, hi is not None, hi or 0
