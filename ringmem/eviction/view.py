"""What the eviction coordinator sees of a cache: a narrow view, nothing private.

The coordinator reads per-head entries (slots, keys, values, positions, scores) of this
rank, the replicated counts, and the process group; it decides keep masks and hands them
back through `keep`, and it plans moves that `move` carries out. The cache implements this
(`ringmem.cache.view.ShardedView`); a test can implement it with plain tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from ..comm import Group


@dataclass
class HeadEntries:
    """This rank's tokens of one (layer, seq), per KV head h in logical slot order."""
    keys: list[Tensor]
    """[n_h, D] (cache dtype; views where the slots are contiguous)."""
    values: list[Tensor]
    positions: list[Tensor]
    """[n_h] int64 global positions."""
    scores: list[Tensor]
    """[n_h] float32 accumulated scores (a copy: write back with `set_scores`)."""


@dataclass(frozen=True)
class Dims:
    num_layers: int
    max_seqs: int
    q_heads: int
    kv_heads: int
    head_dim: int
    windows: tuple[int, ...] = ()
    """Per layer, the sliding window's left size (-1: none); empty: no windowed layer. A
    windowed layer keeps only its window by itself: eviction never touches it."""

    def windowed(self, layer: int) -> bool:
        return bool(self.windows) and self.windows[layer] >= 0

    @property
    def evicted_layers(self) -> list[int]:
        """The layers eviction covers (every layer but the windowed ones), in order."""
        return [i for i in range(self.num_layers) if not self.windowed(i)]


@runtime_checkable
class EvictionView(Protocol):
    """The cache as the coordinator sees it (every method but `entries`, `set_scores` and
    the counters is collective: every rank calls it with the same arguments)."""
    group: Group
    rank: int
    world: int
    device: torch.device
    dims: Dims

    def next_position(self, seq: int = 0, layer: int = 0) -> int:
        """Tokens ever added to (layer, seq): the next global position."""

    def head_counts_of(self, seq: int = 0, layer: int = 0) -> list[list[int]]:
        """[rank][KV head] tokens held, replicated."""

    def rank_counts(self, seq: int = 0, layer: int = 0) -> list[int]:
        """Per rank: slots in use (the most any KV head holds), replicated."""

    def entries(self, layer: int, seq: int) -> HeadEntries:
        """This rank's entries of (layer, seq)."""

    def set_scores(self, layer: int, seq: int, head: int, scores: Tensor) -> None:
        """Write head `head`'s scores [n_h] (logical order) back."""

    def keep(self, layer: int, seq: int, masks: list[Tensor], scores: list[Tensor]) -> None:
        """Keep, per KV head, this rank's entries where masks[h] is True; the others go to
        the cache's eviction action (with scores[h] at eviction); counts are refreshed."""

    def move(self, layer: int, seq: int, src: int, dst: int, keep: int,
             n: list[int]) -> None:
        """Rank `src` keeps its first `keep` slots and sends the next n[h] entries of each
        head to rank `dst`, which appends them (ranks other than src, dst do nothing)."""

    def refresh(self, layer: int, seq: int) -> None:
        """Re-read every rank's counts of (layer, seq) (after moves)."""
