"""Decompose the mask between a query block and a key block into backend calls.

Every mask is a predicate on global positions (`Mask`): causal (key <= query), a sliding
window (query - left <= key <= query + right), documents (same packed document, pads in
none). Given the ascending positions of a local query block and a visiting key block, each
query row i sees one contiguous run of keys [s_i, e_i), and both edges are non-decreasing in
i (documents, causality and windows all move forward with the query). Such a staircase
splits into rectangles a block backend computes natively, each a `Piece` with a band
lo <= j - i <= hi in its own coordinates (None: unbounded):

* full: no band (None, None)
* causal: a square with (None, 0), key j visible iff j <= i (top-left aligned)
* band: a lower edge as well (only windows make one)

Rows that see nothing get no piece; a block with no pieces is skipped by the routing. Every
layout and ring step of a plain causal mask reduces to one or two full/causal pieces.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from .layouts import positions
from .packing import Packing, doc_bounds, normalize, padded_len

_FAR = 1 << 62  # an unbounded edge, in positions
_TILE = 64  # fewest rows of a tile of a narrow band


@dataclass(frozen=True)
class Mask:
    """The attention predicate of one call, identical on every rank."""
    causal: bool = False
    window: tuple[int, int] = (-1, -1)  # (left, right), -1 unbounded (flash-attn)
    docs: Packing | None = None  # cu_seqlens per batch row (one entry: every row)

    @property
    def plain(self) -> bool:
        """Only the causal flag: positions do not matter when not causal."""
        return self.window == (-1, -1) and self.docs is None

    @property
    def per_row(self) -> bool:
        return self.docs is not None and len(self.docs) > 1


@dataclass(frozen=True)
class Piece:
    """One backend call: query rows `q`, key rows `k`, the band lo <= j - i <= hi, batch
    rows `b` (None: all)."""
    q: slice
    k: slice
    lo: int | None = None
    hi: int | None = None
    b: slice | None = None

    @property
    def causal(self) -> bool:
        return self.lo is None and self.hi == 0

    @property
    def band(self) -> tuple[int | None, int | None]:
        return self.lo, self.hi


def check_window(window: object) -> tuple[int, int]:
    if not (isinstance(window, (tuple, list)) and len(window) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in window)):
        raise TypeError(f"window must be a (left, right) pair of ints (-1: unbounded), got "
                        f"{window!r}")
    if min(window) < -1:
        raise ValueError(f"window sizes must be >= 0 or -1 (unbounded), got {tuple(window)}")
    return int(window[0]), int(window[1])


def make_mask(causal: bool, window: object, cu_seqlens: object, batch: int, layout: str,
              world: int, local_len: int) -> Mask:
    """The checked `Mask` of one call; errors name the argument and the value."""
    left, right = check_window(window)
    if causal:
        right = -1  # the causal bound (key <= query) is already tighter than any right >= 0
    if cu_seqlens is None:
        if layout == "document":
            raise ValueError("layout 'document' needs cu_seqlens (the packed documents)")
        return Mask(causal, (left, right), None)
    if layout != "document":
        return Mask(causal, (left, right), normalize(cu_seqlens, batch, local_len * world))
    docs = normalize(cu_seqlens, batch, None)
    need = padded_len(docs, world)
    if need != local_len * world:
        raise ValueError(f"cu_seqlens: layout 'document' pads these documents to {need} "
                         f"positions ({need // world} per rank, see ringmem.shard), but the "
                         f"local sequence length is {local_len}")
    return Mask(causal, (left, right), docs)


def as_mask(mask: bool | tuple[int | None, int | None]) -> tuple[int | None, int | None]:
    """A backend's mask argument as a band: True = causal square, False = full."""
    if isinstance(mask, bool):
        return (None, 0) if mask else (None, None)
    return mask


def causal_flag(mask: bool | tuple[int | None, int | None], who: str) -> bool:
    """A full / causal-square mask as a flag, for ops with only `is_causal`; a real band is
    an error (such a backend reports `unsupported(..., bands=True)`)."""
    band = as_mask(mask)
    if band not in ((None, None), (None, 0)):
        raise ValueError(f"backend {who!r} cannot compute the band mask {band} (lo <= j - i "
                         f"<= hi): it runs full and causal blocks only")
    return band == (None, 0)


def band_mask(band: tuple[int | None, int | None], n: int, m: int,
              device: torch.device | str = "cpu") -> Tensor:
    """Boolean [n, m]: True where key j is visible from query i."""
    lo, hi = as_mask(band)
    diff = torch.arange(m, device=device)[None, :] - torch.arange(n, device=device)[:, None]
    keep = torch.ones(n, m, dtype=torch.bool, device=device)
    if lo is not None:
        keep &= diff >= lo
    if hi is not None:
        keep &= diff <= hi
    return keep


def band_bias(band: tuple[int | None, int | None], n: int, m: int, dtype: torch.dtype,
              device: torch.device | str = "cpu") -> Tensor:
    """[n, m] additive bias: 0 where key j is visible from query i (`band_mask`), -inf
    elsewhere. It depends on j - i only, so it is one vector of n + m - 1 values viewed
    with reversed rows and copied once: 1-2 ms for 2048 x 2048 on one core, where the
    boolean mask and a masked fill took 39 ms (more than the attention it masks)."""
    lo, hi = as_mask(band)
    if n == 0 or m == 0:
        return torch.zeros((n, m), dtype=dtype, device=device)
    diff = torch.arange(-(n - 1), m, device=device)  # j - i along a reversed row
    w = torch.zeros(n + m - 1, dtype=dtype, device=device)
    if lo is not None:
        w.masked_fill_(diff < lo, float("-inf"))
    if hi is not None:
        w.masked_fill_(diff > hi, float("-inf"))
    return w.as_strided((n, m), (1, 1)).flip(0).contiguous()


def _piece(a: int, z: int, s: Tensor, e: Tensor, s_diag: int | None, e_diag: bool,
           b: slice | None, flat: Tensor) -> list[Piece]:
    """Rows [a, z) whose key runs are [s_i, e_i): full/causal pieces when the lower edge
    stays put, else one band piece. flat: the rows i where e[i] == e[i - 1], ascending."""
    ks, ke = int(s[a]), int(e[z - 1])
    if s_diag is None:  # lower edge constant: at most full + causal square + full
        if not e_diag:
            return [Piece(slice(a, z), slice(ks, ke), b=b)]
        j = int(torch.searchsorted(flat, a + 1))  # the diagonal ends at the first flat row
        t = min(int(flat[j]), z) if j < flat.numel() else z
        kc = int(e[a]) - 1
        out = [Piece(slice(a, z), slice(ks, kc), b=b)] if kc > ks else []
        out.append(Piece(slice(a, t), slice(kc, kc + t - a), None, 0, b))
        if t < z:
            out.append(Piece(slice(t, z), slice(kc, ke), b=b))
        return out
    lo = (int(s[s_diag]) - ks) - (s_diag - a)
    hi = int(e[a]) - ks - 1 if e_diag else None
    if hi is not None and hi + 1 >= ke - ks:
        hi = None
    if hi is None or z - a <= 2 * max(hi - lo + 1, _TILE):
        return [Piece(slice(a, z), slice(ks, ke), lo, hi, b)]
    # a narrow band over many rows: tiles of rows, each with only the keys it can see, so
    # the work grows with rows x band width, not rows x keys
    h = max(hi - lo + 1, _TILE)
    c0s = list(range(a, z, h))
    c1s = [min(c0 + h, z) for c0 in c0s]
    starts = s[torch.tensor(c0s)].tolist()
    ends = e[torch.tensor(c1s) - 1].tolist()
    out = []
    for c0, c1, k0, k1 in zip(c0s, c1s, starts, ends):
        shift = (c0 - a) - (k0 - ks)  # the band in the tile's own coordinates
        out.append(Piece(slice(c0, c1), slice(k0, k1), lo + shift, hi + shift, b))
    return out


def run_pieces(s: Tensor, e: Tensor, b: slice | None = None,
               bands: bool = True) -> tuple[Piece, ...]:
    """Pieces covering exactly the pairs (i, j) with s[i] <= j < e[i] (s, e non-decreasing).
    bands=False: only full and causal pieces (a moving lower edge starts a new piece).

    A piece grows row by row while both edges step by 0 or 1 in a shape one piece can
    hold. Rows are visited by runs of equal key (the row has keys, the lower edge's step,
    the upper edge's step): within a run, once a row has joined the open piece every later
    row joins it too and changes nothing, and a run of rows without keys opens nothing,
    so the scan costs a few steps of Python per run, not one per row."""
    n = s.numel()
    if n == 0:
        return ()
    s, e = s.cpu(), e.cpu()
    okt = e > s
    dst, det = s[1:] - s[:-1], e[1:] - e[:-1]
    flat = torch.nonzero(det == 0).flatten() + 1
    # first rows of the runs: row 0, row 1, then wherever the row's key changes
    change = (okt[2:] != okt[1:-1]) | (dst[1:] != dst[:-1]) | (det[1:] != det[:-1])
    firsts = torch.cat([torch.tensor([0, 1][:n]), torch.nonzero(change).flatten() + 2])
    oks = okt[firsts].tolist()
    prev = (firsts - 1).clamp(min=0)[1:]  # row 0 has no step (nothing is open before it)
    steps = list(zip([0, *dst[prev].tolist()], [0, *det[prev].tolist()])) if n > 1 else [(0, 0)]
    fs = firsts.tolist()
    pieces: list[Piece] = []
    a = None  # first row of the open piece
    s_diag: int | None = None  # first row where the lower edge moved
    e_diag = e_flat = False   # the upper edge has moved / has stopped moving

    def visit(i: int, ok: bool, ds: int, de: int) -> bool:
        """Row i's step of the scan (its key: ok, ds, de); True if it joined the open piece."""
        nonlocal a, s_diag, e_diag, e_flat
        if a is not None and i < n and ok and ds in (0, 1) and de in (0, 1):
            s_ok = (ds == 1 and bands) or (ds == 0 and s_diag is None)
            e_ok = de == 0 or not e_flat
            if s_ok and e_ok:
                if ds == 1 and s_diag is None:
                    s_diag = i
                e_diag |= de == 1
                e_flat |= de == 0
                return True
        if a is not None:
            pieces.extend(_piece(a, i, s, e, s_diag, e_diag, b, flat))
            a = None
        if i < n and ok:
            a, s_diag, e_diag, e_flat = i, None, False, False
        return False

    for first, end, ok, (ds, de) in zip(fs, fs[1:] + [n], oks, steps):
        visit(first, ok, ds, de)
        if not ok:  # a run of rows without keys: nothing opens, nothing joins
            continue
        for i in range(first + 1, end):
            if visit(i, ok, ds, de):  # joined: the rest of the run joins too, unchanged
                break
    visit(n, False, 0, 0)
    return tuple(pieces)


def staircase_pieces(q_pos: Tensor, k_pos: Tensor) -> tuple[Piece, ...]:
    """Pieces covering exactly the pairs (i, j) with k_pos[j] <= q_pos[i]."""
    e = torch.searchsorted(k_pos, q_pos, right=True)
    return run_pieces(torch.zeros_like(e), e)


def key_runs(q_pos: Tensor, k_pos: Tensor, mask: Mask,
             bounds: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
    """(s, e): the keys of query row i are k[s_i:e_i] (ascending positions)."""
    lo = torch.full_like(q_pos, -_FAR)
    hi = torch.full_like(q_pos, _FAR)
    if bounds is not None:  # the query's own document; pads see nothing
        starts, ends = bounds
        d = torch.searchsorted(starts, q_pos, right=True) - 1
        dc = d.clamp(min=0)
        real = (d >= 0) & (q_pos < ends[dc])
        lo = torch.where(real, starts[dc], lo)
        hi = torch.where(real, ends[dc], torch.full_like(hi, -_FAR))
    left, right = mask.window
    if mask.causal:
        hi = torch.minimum(hi, q_pos + 1)
    if left >= 0:
        lo = torch.maximum(lo, q_pos - left)
    if right >= 0:
        hi = torch.minimum(hi, q_pos + right + 1)
    s = torch.searchsorted(k_pos, lo)
    e = torch.searchsorted(k_pos, hi)
    return s, torch.maximum(e, s)


_BY_ORDER = ("contiguous", "zigzag", "stripe")  # layouts whose causal blocks go by rank order


def by_rank_order(layout: str, world: int, q_len: int, kv_len: int, mask: Mask) -> bool:
    """Whether a block's pieces depend only on whether the query rank is before, at or
    after the key rank (a plain mask over these layouts; tests/test_masks.py checks every
    pair), so a ring of any size computes three distinct blocks."""
    return mask.plain and layout in _BY_ORDER and world > 1 and q_len == kv_len


def block_pieces(layout: str, world: int, q_rank: int, q_len: int, kv_rank: int,
                 kv_len: int, mask: Mask | bool, fold: int = 1) -> tuple[Piece, ...]:
    """Pieces for the query block of `q_rank` against the key block of `kv_rank` (ranks of
    `world` that each hold `fold` layout shards, see `layouts.positions`)."""
    if isinstance(mask, bool):
        mask = Mask(causal=mask)
    if by_rank_order(layout, world, q_len, kv_len, mask):
        q_rank, kv_rank = ((1, 0) if q_rank > kv_rank else (0, 0) if q_rank == kv_rank
                           else (0, 1))
    return _block_pieces(layout, world, q_rank, q_len, kv_rank, kv_len, mask, fold)


@lru_cache(maxsize=4096)
def _block_pieces(layout: str, world: int, q_rank: int, q_len: int, kv_rank: int,
                  kv_len: int, mask: Mask, fold: int) -> tuple[Piece, ...]:
    if q_len == 0 or kv_len == 0:  # e.g. a rank that holds no cached prefix yet
        return ()
    if mask.plain and not mask.causal:
        return (Piece(slice(0, q_len), slice(0, kv_len)),)
    total = q_len * world
    base = world * fold  # the ranks the layout was sharded over
    rows = mask.docs if mask.docs is not None else (None,)
    out: list[Piece] = []
    for r, cu in enumerate(rows):
        qp = positions(layout, q_rank, world, q_len, cu, fold)
        kp = positions(layout, kv_rank, world, kv_len, cu, fold)
        bounds = None if cu is None else doc_bounds(cu, layout == "document", base, total)
        b = slice(r, r + 1) if mask.per_row else None
        out += run_pieces(*key_runs(qp, kp, mask, bounds), b, bands=mask.window[0] >= 0)
    return tuple(out)


def pieces_mask(pieces: tuple[Piece, ...], q_len: int, kv_len: int,
                batch: int = 1) -> Tensor:
    """Boolean mask that `pieces` cover: [q_len, kv_len], or [batch, q_len, kv_len] when
    batch > 1 (for tests and debugging). Overlapping pieces would be a bug: counted."""
    count = torch.zeros(batch, q_len, kv_len, dtype=torch.int32)
    for p in pieces:
        rows, cols = p.q.stop - p.q.start, p.k.stop - p.k.start
        b = p.b if p.b is not None else slice(0, batch)
        count[b, p.q, p.k] += band_mask(p.band, rows, cols).int()
    if count.max() > 1:
        raise AssertionError("pieces overlap")
    return count.bool()[0] if batch == 1 else count.bool()


def pairs(p: Piece) -> int:
    """(query, key) pairs one piece computes, per batch row it covers."""
    n, m = p.q.stop - p.q.start, p.k.stop - p.k.start
    if p.lo is None and p.hi is None:
        return n * m
    r = torch.arange(n)
    lo = torch.zeros(n, dtype=torch.int64) if p.lo is None else (r + p.lo).clamp(0, m)
    hi = torch.full((n,), m) if p.hi is None else (r + p.hi + 1).clamp(0, m)
    return int((hi - lo).clamp(min=0).sum())
