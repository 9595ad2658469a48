"""Packed documents (`cu_seqlens`): checks, the per-document layout's padding, document
bounds in layout coordinates, and the position ids that restart at each document.

`cu_seqlens` follows flash-attn: offsets [0, l0, l0 + l1, ..., S] of the documents in a packed
row of S tokens (the *global* row, the same on every rank). One sequence of offsets serves
every batch row; a list (or a 2-D tensor) gives each row its own packing.

The "document" layout splits every document into 2 * world equal chunks and gives rank r
chunks r and 2 * world - 1 - r (per-document head-tail balancing: each rank gets the same
causal work of every document). A document whose length is not a multiple of 2 * world is
padded at its end inside ringmem; rows padded to different lengths get a trailing pad
segment, so every row holds the same number of positions. Pad positions belong to no
document: no query sees them, their own rows see nothing, `unshard` drops them.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import Tensor

Packing = tuple[tuple[int, ...], ...]  # cu_seqlens per batch row (one entry: every row)


def _as_offsets(x: object, name: str) -> tuple[int, ...]:
    if isinstance(x, Tensor):
        if x.dtype.is_floating_point or x.dtype == torch.bool or x.dtype.is_complex:
            raise TypeError(f"{name} must hold integers (int32, as flash-attn), got {x.dtype}")
        if x.dim() != 1:
            raise ValueError(f"{name} must be 1-D offsets, got shape {tuple(x.shape)}")
        return tuple(int(v) for v in x.tolist())
    if isinstance(x, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool)
                                            for v in x):
        return tuple(x)
    raise TypeError(f"{name} must be an integer tensor or a sequence of ints, "
                    f"got {type(x).__name__}")


def check_offsets(cu: tuple[int, ...], seq_len: int | None, name: str) -> None:
    if len(cu) < 2:
        raise ValueError(f"{name} needs at least 2 offsets [0, ..., S], got {list(cu)}")
    if cu[0] != 0:
        raise ValueError(f"{name} must start at 0, got {cu[0]}")
    bad = next((i for i in range(1, len(cu)) if cu[i] < cu[i - 1]), None)
    if bad is not None:
        raise ValueError(f"{name} must be non-decreasing, got {cu[bad - 1]} then {cu[bad]} at "
                         f"index {bad}")
    if seq_len is not None and cu[-1] != seq_len:
        raise ValueError(f"{name} must end at the global sequence length {seq_len}, got "
                         f"{cu[-1]}")


def normalize(cu_seqlens: object, batch: int, seq_len: int | None) -> Packing:
    """`cu_seqlens` as one offsets tuple per packing (one in all when the rows agree);
    ValueError/TypeError name the argument. seq_len None: the rows must end alike."""
    if isinstance(cu_seqlens, Tensor) and cu_seqlens.dim() == 2:
        rows = [cu_seqlens[i] for i in range(cu_seqlens.shape[0])]
    elif isinstance(cu_seqlens, (list, tuple)) and cu_seqlens and not all(
            isinstance(v, int) and not isinstance(v, bool) for v in cu_seqlens):
        rows = list(cu_seqlens)
    else:
        rows = None
    if rows is None:
        cu = _as_offsets(cu_seqlens, "cu_seqlens")
        check_offsets(cu, seq_len, "cu_seqlens")
        return (cu,)
    if len(rows) != batch:
        raise ValueError(f"cu_seqlens has {len(rows)} rows of offsets but the batch has "
                         f"{batch} rows")
    out = []
    for i, r in enumerate(rows):
        cu = _as_offsets(r, f"cu_seqlens[{i}]")
        check_offsets(cu, seq_len, f"cu_seqlens[{i}]")
        if out and cu[-1] != out[0][-1]:
            raise ValueError(f"every row of cu_seqlens must end at the same sequence length, "
                             f"got {out[0][-1]} (row 0) and {cu[-1]} (row {i})")
        out.append(cu)
    return (out[0],) if len(set(out)) == 1 else tuple(out)


def chunks(world: int) -> int:
    return 2 * world if world > 1 else 1


def _padded(length: int, world: int) -> int:
    c = chunks(world)
    return -(-length // c) * c


def padded_len(packing: Packing, world: int) -> int:
    """Positions per row under the "document" layout (every row padded to the longest)."""
    return max(sum(_padded(b - a, world) for a, b in zip(cu, cu[1:])) for cu in packing)


@lru_cache(maxsize=256)
def segments(cu: tuple[int, ...], world: int,
             total: int) -> tuple[tuple[int, int, int, int], ...]:
    """(padded start, real length, padded length, unpadded start) of each non-empty
    document of a row under the "document" layout, then a trailing pad segment (real
    length 0) up to `total`."""
    out, at = [], 0
    for a, b in zip(cu, cu[1:]):
        n = _padded(b - a, world)
        if n:
            out.append((at, b - a, n, a))
        at += n
    if at > total:
        raise ValueError(f"the packing needs {at} padded positions, more than {total}")
    if total > at:
        out.append((at, 0, total - at, cu[-1]))
    return tuple(out)


@lru_cache(maxsize=256)
def document_positions(cu: tuple[int, ...], rank: int, world: int, total: int) -> Tensor:
    """Ascending padded positions that `rank` owns under the "document" layout."""
    c = chunks(world)
    parts = []
    for start, _, n, _ in segments(cu, world, total):
        size = n // c
        for chunk in sorted({rank, c - 1 - rank}):
            parts.append(torch.arange(start + chunk * size, start + (chunk + 1) * size))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


@lru_cache(maxsize=256)
def doc_bounds(cu: tuple[int, ...], document_layout: bool, world: int,
               total: int) -> tuple[Tensor, Tensor]:
    """(starts, ends) of each document's real tokens in layout coordinates (int64)."""
    if document_layout:
        seg = [(s, s + n) for s, n, _, _ in segments(cu, world, total) if n]
    else:
        seg = [(a, b) for a, b in zip(cu, cu[1:]) if b > a]
    t = torch.tensor(seg, dtype=torch.int64).reshape(-1, 2)
    return t[:, 0].contiguous(), t[:, 1].contiguous()


def source_index(cu: tuple[int, ...], world: int, total: int) -> Tensor:
    """For each padded position of the "document" layout, its index in the unpadded row
    (-1 for pads)."""
    src = torch.full((total,), -1, dtype=torch.int64)
    for start, n, _, a in segments(cu, world, total):
        src[start:start + n] = torch.arange(a, a + n)
    return src


def position_ids(pos: Tensor, cu: tuple[int, ...], document_layout: bool, world: int,
                 total: int) -> Tensor:
    """Position inside its document of each layout position in `pos` (0 for pads)."""
    starts, ends = doc_bounds(cu, document_layout, world, total)
    d = torch.searchsorted(starts, pos, right=True) - 1
    dc = d.clamp(min=0)
    real = (d >= 0) & (pos < ends[dc])
    return torch.where(real, pos - starts[dc], torch.zeros_like(pos))


def rows_of(packing: Packing, batch: int) -> Sequence[tuple[int, ...]]:
    """The packing of each batch row."""
    return packing * batch if len(packing) == 1 else packing
