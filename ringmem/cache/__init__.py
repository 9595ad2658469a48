"""Sharded, paged KV cache with chunked prefill and exact distributed decode, and memory
tiers (host, disk) that evicted entries are demoted to and recalled from."""
from .paged import PagedStore
from .persist import PageCorruptError
from .sharded import CacheConfig, ShardedKVCache
from .summaries import PageSummaries, page_bounds, select_pages
from .tiered import Demote, TieredPages, TierPolicy
from .tiers import TierConfig, TierStore
from .transfer import Page, TransferEngine

__all__ = ["CacheConfig", "Demote", "Page", "PageCorruptError", "PageSummaries",
           "PagedStore", "ShardedKVCache", "TierConfig", "TierPolicy", "TierStore",
           "TieredPages", "TransferEngine", "page_bounds", "select_pages"]
