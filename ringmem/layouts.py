"""Sequence layouts: which global token positions each rank of the ring owns.

Every layout yields, per rank, a sorted tensor of global positions. Everything causal in
ringmem (which blocks are full, diagonal, empty) is derived from these positions, never
special-cased per layout. The "document" layout (packed documents, each split head-tail
across the ranks) depends on the packing: see `ringmem.packing`.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from .packing import chunks, document_positions

LAYOUTS = ("contiguous", "zigzag", "stripe", "document")
PLAIN_LAYOUTS = LAYOUTS[:3]  # the layouts that need no packing


def check_layout(layout: object) -> str:
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def local_len_error(layout: str, local_len: int, world: int) -> str | None:
    """Why `layout` cannot hold `local_len` tokens per rank on `world` ranks, or None."""
    if local_len < 1:
        return f"the local sequence length must be >= 1, got {local_len}"
    if layout in ("zigzag", "document") and world > 1 and local_len % 2:
        return (f"layout 'zigzag' splits each rank's tokens into two chunks, so the local "
                f"sequence length must be even, got {local_len} (world size {world})")
    return None


@lru_cache(maxsize=256)
def _positions(layout: str, rank: int, world: int, local_len: int) -> torch.Tensor:
    if layout == "contiguous" or world == 1:
        return torch.arange(rank * local_len, (rank + 1) * local_len)
    if layout == "zigzag":
        half = local_len // 2
        first = torch.arange(rank * half, (rank + 1) * half)
        mirror = 2 * world - 1 - rank
        return torch.cat([first, torch.arange(mirror * half, (mirror + 1) * half)])
    if layout == "stripe":
        return torch.arange(local_len) * world + rank
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def positions(layout: str, rank: int, world: int, local_len: int,
              docs: tuple[int, ...] | None = None, fold: int = 1) -> torch.Tensor:
    """Global positions (int64, CPU, ascending) of the `local_len` tokens that `rank` owns.

    The "document" layout needs `docs`, the row's cu_seqlens; its positions index the
    padded row (`ringmem.packing`). fold=u: the sequence was sharded over world * u ranks
    and `rank` holds the union of ranks rank*u .. rank*u+u-1 (a Ulysses group after its
    all-to-all), sorted."""
    if fold > 1:
        if local_len % fold:
            raise ValueError(f"a fold of {fold} ranks needs a local length divisible by it, "
                             f"got {local_len}")
        parts = [positions(layout, rank * fold + i, world * fold, local_len // fold, docs)
                 for i in range(fold)]
        return torch.sort(torch.cat(parts)).values
    check_layout(layout)
    err = local_len_error(layout, local_len, world)
    if err:
        raise ValueError(err)
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    if layout == "document":
        if docs is None:
            raise ValueError("layout 'document' needs the packing (cu_seqlens)")
        return document_positions(docs, rank, world, local_len * world)
    return _positions(layout, rank, world, local_len)


def global_permutation(layout: str, world: int, local_len: int,
                       docs: tuple[int, ...] | None = None) -> torch.Tensor:
    """perm such that full[perm] == cat(shard_0, ..., shard_{P-1}) along the sequence."""
    return torch.cat([positions(layout, r, world, local_len, docs) for r in range(world)])


def chunk_count(layout: str, world: int) -> int:
    """Equal chunks the layout splits a sequence into: its length must be a multiple."""
    return chunks(world) if layout in ("zigzag", "document") else world


def split_len(layout: str, seq_len: int, world: int) -> int:
    """Local length for a global `seq_len`, or ValueError if the layout cannot split it."""
    check_layout(layout)
    chunks = chunk_count(layout, world)
    if seq_len < chunks or seq_len % chunks:
        raise ValueError(f"layout {layout!r} on {world} ranks splits the sequence into {chunks} "
                         f"equal chunks; sequence length {seq_len} is not a positive multiple "
                         f"of {chunks}")
    return seq_len // world
