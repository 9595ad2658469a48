"""Sharded, paged KV cache with chunked prefill and exact distributed decode, and memory
tiers (host, disk) that evicted entries are demoted to and recalled from."""
from .graphed import GraphedDecode
from .paged import PagedStore
from .sharded import CacheConfig, ShardedKVCache
from .tiers import (
    Demote,
    Page,
    PageCorruptError,
    PageSummaries,
    TieredPages,
    TierPolicy,
    TierStore,
    TransferEngine,
    page_bounds,
    select_pages,
)

__all__ = ["CacheConfig", "Demote", "GraphedDecode", "Page", "PageCorruptError", "PageSummaries",
           "PagedStore", "ShardedKVCache", "TierPolicy", "TierStore",
           "TieredPages", "TransferEngine", "page_bounds", "select_pages"]
