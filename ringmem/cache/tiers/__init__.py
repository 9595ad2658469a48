"""Memory tiers below the hot KV pages: evicted entries are demoted to host RAM and disk,
and recalled by query at decode.

Modules, each importing only those listed before it (no import cycles):

* `staging`: the lifetime rules of asynchronous copies (events, pinned buffers),
  `StagingPool` (reusable pinned staging buffers) and `Readback` (the step's one read).
* `summaries`: `PageKey`, Quest page summaries (`PageSummaries`, `page_bounds`,
  `select_pages`): rank demoted pages without touching them.
* `records`: checksummed record files (one per disk page); `PageCorruptError`.
* `persist`: cache-shard checkpoints made of records.
* `policy`: `TierPolicy`, the one user-facing configuration.
* `host`: `Page` (one page's tensors) and `HostPool` (the host tier's slot segments).
* `disk`: `DiskFiles`, the disk tier's page files (verified reads, deferred writes).
* `store`: `TierStore`, one rank's host and disk tiers (LRU spill, recall, delete).
* `transfer`: `TransferEngine`, the store's moves on a background worker.
* `pages`: `TieredPages` (the object a `ShardedKVCache` holds) and the `Demote` action.
"""
from .host import HostPool, Page
from .pages import Demote, TieredPages
from .policy import TierPolicy
from .records import PageCorruptError
from .store import TierStore
from .summaries import PageKey, PageSummaries, page_bounds, select_pages
from .transfer import Transfer, TransferEngine

__all__ = ["Demote", "HostPool", "Page", "PageCorruptError", "PageKey", "PageSummaries",
           "TierPolicy", "TierStore", "TieredPages", "Transfer", "TransferEngine",
           "page_bounds", "select_pages"]
