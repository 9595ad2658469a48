"""What the cache's stages see of a `ShardedKVCache`: its parts, typed as protocols.

The stages (prefill.py, decode.py, window.py, checkpoint.py) are functions of the cache's
state, and `ShardedKVCache` calls them; typing their argument as the cache class itself
would make each stage and the cache import each other. They take these protocols instead,
which `ShardedKVCache` satisfies by its attributes: `Shards` for what a sliding window
touches (the stores, the replicated index and window tracker, the ranks), `Parts` for the
whole state a prefill, decode or checkpoint needs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from ..backends import Backend
    from ..comm import Group
    from ..eviction.coordinator import Coordinator
    from .config import CacheConfig
    from .index import CacheIndex, WindowTracker
    from .paged import PagedStore
    from .tiers import TieredPages


@runtime_checkable
class Shards(Protocol):
    """This rank's K/V stores and the replicated state that places tokens among the ranks."""
    group: Group
    rank: int
    world: int
    stores: list[PagedStore]  # per layer: this rank's shard
    index: CacheIndex  # replicated: who holds how many tokens
    windows: WindowTracker  # replicated: the positions each rank holds of windowed layers


@runtime_checkable
class Parts(Shards, Protocol):
    """Everything a prefill, decode step or checkpoint reads or updates."""
    config: CacheConfig
    device: torch.device
    tiers: TieredPages | None
    eviction: Coordinator | None
    decoder: Backend  # the backend of decode's local pass
    # per layer: (pinned flag, event) of a GPU decode step's cross-rank input check
    pending_checks: dict[int, tuple[Tensor, object]]
