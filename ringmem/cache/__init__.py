"""Sharded, paged KV cache with chunked prefill and exact distributed decode."""
from .paged import PagedStore
from .sharded import CacheConfig, ShardedKVCache

__all__ = ["CacheConfig", "ShardedKVCache", "PagedStore"]
