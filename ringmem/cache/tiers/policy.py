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

ATTEND = ("recall", "host", "auto")


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
    attend: str = "recall"
    """How decode reaches the demoted pages: "recall" (the `recall` pages the query's bound
    ranks highest are copied to the hot device and attended there), "host" (every host-tier
    page attended where it lives, exactly, by the compiled CPU kernel: only the partial,
    out and lse, a few KB, moves to the device, merged there by lse), or "auto" (per step
    and sequence, "host" when host_bytes / host_gbps <= recalled_bytes / link_gbps, else
    "recall"). "host" and "auto" need disk_pages = 0: disk pages are not attended in
    place."""
    link_gbps: float = 25.0
    """With attend="auto": host-to-device GB/s assumed by the cost rule (PCIe 4.0 x16 in
    practice; on a CPU cache, recalls are memcpys)."""
    host_gbps: float = 10.0
    """With attend="auto": GB/s the CPU kernel streams the host pages at (about 70% of one
    core's read bandwidth on a 2020s server core: benchmarks/results/decode_cpu.md)."""
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
        if self.attend not in ATTEND:
            raise ValueError(f"attend must be one of {ATTEND}, got {self.attend!r}")
        if self.attend != "recall" and self.disk_pages:
            raise ValueError(f"attend={self.attend!r} attends host pages in place; with "
                             f"disk_pages={self.disk_pages} use attend='recall'")
        for name in ("link_gbps", "host_gbps"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not val > 0:
                raise ValueError(f"{name} must be a positive number, got {val!r}")

    def signature(self) -> tuple[int, ...]:
        """Ints every rank must agree on."""
        return (1, self.recall, ATTEND.index(self.attend))


def check_count(name: str, val: object, *, positive: bool = False) -> None:
    """ValueError naming `name` and `val` unless it is a non-negative (positive) int."""
    if isinstance(val, bool) or not isinstance(val, int) or val < int(positive):
        what = "a positive" if positive else "a non-negative"
        raise ValueError(f"{name} must be {what} int, got {val!r}")
