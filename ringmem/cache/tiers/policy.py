"""`TierPolicy`: the one user-facing configuration of the memory tiers.

Given to `ShardedKVCache(..., tiers=TierPolicy(...))`; the cache builds each rank's
`TierStore` from it plus its own dims (kv_heads, head_dim, page_size, dtype), the rank and
the hot device. A standalone `TierStore` takes the same policy (its `recall` and `prefetch`
are only read by `TieredPages`) and two store-level knobs of its own (`disk_full`,
`pin_memory`) that the cache leaves at their defaults.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ...arguments import check_flag


@dataclass(frozen=True, kw_only=True)
class TierPolicy:
    host_pages: int
    """Host-tier capacity of each rank, in pages (0: demote straight to disk)."""
    disk_pages: int = 0
    """Disk-tier capacity of each rank, in pages (0: no disk tier)."""
    disk_dir: str | os.PathLike[str] | None = None
    """Root of the disk tier (rank r writes under <disk_dir>/rank<r>/); needed with disk."""
    recall: int = 8
    """Demoted pages each rank recalls per (layer, seq) per decode step."""
    prefetch: bool = True
    """Recall the next layer's pages on a background worker (CUDA: a side stream)."""
    segment_pages: int = 64
    """Host slots allocated at a time; segments are allocated whole, one at a time, as
    needed."""
    fsync: bool = False
    """fsync every spilled page file and its directory. Off by default: spilled pages live
    only as long as the process (checkpoints always sync); the rename and the checksum
    already rule out reading a torn page."""

    def __post_init__(self) -> None:
        for name in ("host_pages", "disk_pages", "recall", "segment_pages"):
            check_count(name, getattr(self, name), positive=name == "segment_pages")
        if self.host_pages + self.disk_pages == 0:
            raise ValueError("host_pages and disk_pages are both 0: no tier to demote to")
        if self.disk_pages and (not isinstance(self.disk_dir, (str, os.PathLike))
                                or not os.fspath(self.disk_dir)):
            raise ValueError(f"disk_pages={self.disk_pages} needs a disk_dir, got "
                             f"{self.disk_dir!r}")
        for name in ("prefetch", "fsync"):
            check_flag(name, getattr(self, name))

    def signature(self) -> tuple[int, ...]:
        """Ints every rank must agree on."""
        return (1, self.recall)


def check_count(name: str, val: object, *, positive: bool = False) -> None:
    """ValueError naming `name` and `val` unless it is a non-negative (positive) int."""
    if isinstance(val, bool) or not isinstance(val, int) or val < int(positive):
        what = "a positive" if positive else "a non-negative"
        raise ValueError(f"{name} must be {what} int, got {val!r}")
