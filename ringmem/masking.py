"""Decompose the causal relation between a query block and a key block into backend calls.

Given the ascending global positions of a local query block and of a visiting key block,
query i sees key j iff k_pos[j] <= q_pos[i]. Because both are ascending, row i sees a
prefix of c_i keys and c is non-decreasing: a staircase. A staircase splits into
rectangles that a block backend computes natively:

* a *full* piece: rows [a, b) x keys [0, c)             (no mask)
* a *causal* piece: rows [a, b) x keys [kc, kc + b - a)  (square, key j visible iff j <= i)

Rows with c_i == 0 see nothing and get no piece. Every layout and every ring step reduces
to one or two pieces: zigzag's own block is one causal piece, its other blocks one full
piece each; stripe blocks are causal pieces shifted by at most one row.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .layouts import positions


@dataclass(frozen=True)
class Piece:
    """One backend call: query rows `q`, key rows `k`, with a square causal mask or none."""
    q: slice
    k: slice
    causal: bool


def staircase_pieces(q_pos: torch.Tensor, k_pos: torch.Tensor) -> tuple[Piece, ...]:
    """Pieces covering exactly the pairs (i, j) with k_pos[j] <= q_pos[i]."""
    n = q_pos.numel()
    c = torch.searchsorted(k_pos, q_pos, right=True)
    idx = torch.arange(n)
    # rows where a constant run (same c) or a diagonal run (c grows by one per row) breaks
    const_breaks = (torch.nonzero(c[1:] != c[:-1]).flatten() + 1).tolist() + [n]
    diag_breaks = (torch.nonzero((c - idx)[1:] != (c - idx)[:-1]).flatten() + 1).tolist() + [n]
    counts = c.tolist()
    pieces: list[Piece] = []
    a = int(torch.searchsorted(c, torch.tensor(0), right=True))  # skip rows that see nothing
    ci = di = 0
    while a < n:
        while const_breaks[ci] <= a:
            ci += 1
        while diag_breaks[di] <= a:
            di += 1
        end_const, end_diag = const_breaks[ci], diag_breaks[di]
        if end_const >= end_diag:  # a full rectangle covers at least as many rows
            pieces.append(Piece(slice(a, end_const), slice(0, counts[a]), False))
            a = end_const
        else:
            kc = counts[a] - 1
            if kc > 0:
                pieces.append(Piece(slice(a, end_diag), slice(0, kc), False))
            pieces.append(Piece(slice(a, end_diag), slice(kc, kc + end_diag - a), True))
            a = end_diag
    return tuple(pieces)


@lru_cache(maxsize=4096)
def block_pieces(layout: str, world: int, q_rank: int, q_len: int, kv_rank: int,
                 kv_len: int, causal: bool) -> tuple[Piece, ...]:
    """Pieces for the query block of `q_rank` against the key block of `kv_rank`."""
    if q_len == 0 or kv_len == 0:  # e.g. a rank that holds no cached prefix yet
        return ()
    if not causal:
        return (Piece(slice(0, q_len), slice(0, kv_len), False),)
    return staircase_pieces(positions(layout, q_rank, world, q_len),
                            positions(layout, kv_rank, world, kv_len))


def pieces_mask(pieces: tuple[Piece, ...], q_len: int, kv_len: int) -> torch.Tensor:
    """Boolean [q_len, kv_len] mask that `pieces` cover (for tests and debugging)."""
    mask = torch.zeros(q_len, kv_len, dtype=torch.bool)
    for p in pieces:
        rows, cols = p.q.stop - p.q.start, p.k.stop - p.k.start
        block = torch.ones(rows, cols, dtype=torch.bool)
        mask[p.q, p.k] |= block.tril() if p.causal else block
    return mask
