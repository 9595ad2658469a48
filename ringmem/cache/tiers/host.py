"""The host tier's memory: `Page` (one page's tensors) and `HostPool` (its slots).

`HostPool`: host memory for pages, allocated in fixed segments of page slots (pinned when
CUDA is present, so GPU copies are asynchronous DMA), never one huge buffer; pages that sit
in consecutive slots move in one strided copy.
"""
from __future__ import annotations

import heapq
from typing import NamedTuple

import torch
from torch import Tensor


class Page(NamedTuple):
    """One or more pages' tensors, n slots along the token axis."""
    k: Tensor
    """[Hkv, n, D]"""
    v: Tensor
    """[Hkv, n, D]"""
    pos: Tensor
    """[Hkv, n] int64 global positions per head and slot (-1: empty slot)"""
    score: Tensor
    """[Hkv, n] float32 importance scores"""


class HostPool:
    """Page slots on the host: segments of `segment_pages` slots, each a Page of
    [S, Hkv, page_size, ...] tensors, allocated whole and only when needed, up to
    `capacity` slots."""

    def __init__(self, *, capacity: int, segment_pages: int, kv_heads: int, page_size: int,
                 head_dim: int, dtype: torch.dtype, pin: bool) -> None:
        self.spec = dict(capacity=capacity, segment_pages=segment_pages, kv_heads=kv_heads,
                         page_size=page_size, head_dim=head_dim, dtype=dtype, pin=pin)
        self.capacity, self.seg_n, self.ps = capacity, segment_pages, page_size
        self.segments: list[Page] = []
        self._free: list[int] = []  # a min-heap: low slots first, so runs stay consecutive

    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for seg in self.segments for t in seg)

    def take(self, m: int) -> list[int]:
        """The m smallest free slots, ascending (segments allocated as needed)."""
        while len(self._free) < m:
            self._grow()
        return [heapq.heappop(self._free) for _ in range(m)]

    def give(self, slot: int) -> None:
        heapq.heappush(self._free, slot)

    def slot(self, slot: int) -> Page:
        """Views [Hkv, page_size, ...] of one slot."""
        return Page(*(t[slot % self.seg_n] for t in self.segments[slot // self.seg_n]))

    def copy_runs(self, slots: list[int], sizes: list[int], tokens: Page, at: int, *,
                  into_slots: bool) -> None:
        """Copy pages between slots and a token-axis Page (pages back to back from `at`);
        full pages in consecutive slots of one segment move in one strided copy each."""
        i, ps = 0, self.ps
        while i < len(slots):
            j = i + 1
            while (j < len(slots) and sizes[i] == sizes[j] == ps
                   and slots[j] == slots[j - 1] + 1 and slots[j] % self.seg_n):
                j += 1
            seg, a, m = self.segments[slots[i] // self.seg_n], slots[i] % self.seg_n, j - i
            for x, t in zip(seg, tokens):
                if m == 1:
                    held, tok = x[a, :, :sizes[i]], t[:, at:at + sizes[i]]
                else:  # slots [m, Hkv, ps, ...] <-> tokens [Hkv, m * ps, ...]
                    held, tok = x[a:a + m].transpose(0, 1), t[:, at:at + m * ps].unflatten(
                        1, (m, ps))
                if into_slots:
                    held.copy_(tok)
                else:
                    tok.copy_(held)
            at += sum(sizes[i:j])
            i = j

    def _grow(self) -> None:
        sp, s = self.spec, self.seg_n
        base = len(self.segments) * s
        assert base < self.capacity, "host capacity exceeded"
        shape = (s, sp["kv_heads"], self.ps)
        self.segments.append(Page(*(
            torch.empty(shape + tail, dtype=dt, pin_memory=sp["pin"]) for dt, tail in
            ((sp["dtype"], (sp["head_dim"],)), (sp["dtype"], (sp["head_dim"],)),
             (torch.int64, ()), (torch.float32, ())))))
        # slots past the capacity are never handed out: a partial last segment never overfills
        for slot in range(base, min(base + s, self.capacity)):
            heapq.heappush(self._free, slot)
