"""What happens to evicted entries: a pluggable action.

The coordinator hands every evicted (KV head, token) entry of a compression to the action
*before* the cache compacts it away. `HardDrop` (the default) discards them. With
`ShardedKVCache(..., tiers=TierPolicy(...))` the cache installs `ringmem.cache.Demote`
instead, which keeps them recallable on host and disk tiers; nothing else in the cache
depends on which action runs.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class EvictionAction(Protocol):
    """Receives evicted entries, one call per (layer, seq, KV head) with anything evicted."""

    def demote(self, layer: int, seq: int, head: int, pos: Tensor, k: Tensor, v: Tensor,
               score: Tensor) -> None:
        """pos [n] global positions, k/v [n, D] (cache dtype and device; the caller's
        copies, safe to keep), score [n] float32 scores at eviction time."""
        ...


class HardDrop:
    """Evicted entries are gone (their slots are reused)."""

    def demote(self, layer: int, seq: int, head: int, pos: Tensor, k: Tensor, v: Tensor,
               score: Tensor) -> None:
        return None
