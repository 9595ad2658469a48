"""The host tier's memory: `Page` (one page's tensors) and `HostPool` (its slots).

`HostPool`: host memory for pages, allocated in fixed segments of page slots (pinned when
CUDA is present, so GPU copies are asynchronous DMA), never one huge buffer; pages that sit
in consecutive slots move in one copy. Copies with the device are `non_blocking` between
a contiguous block of whole slots and the device, and each slot remembers the event of
the last such copy (the rules in `staging`).
"""
from __future__ import annotations

import heapq
from typing import NamedTuple

import torch
from torch import Tensor

from .staging import Event, record, wait_host


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
        # slot -> event of the last device copy reading or writing it (CUDA): device work
        # on the slot waits for it on the device, host access on the host
        self._events: dict[int, Event] = {}
        self.whole_slots: bool | None = None
        """Move whole slots, a contiguous host block per run, slicing pages on the token
        side: None = when the tokens are on an accelerator (the host end of a DMA must be
        contiguous); True checks that path on CPU."""

    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for seg in self.segments for t in seg)

    def take(self, m: int) -> list[int]:
        """The m smallest free slots, ascending (segments allocated as needed)."""
        while len(self._free) < m:
            self._grow()
        return [heapq.heappop(self._free) for _ in range(m)]

    def give(self, slot: int) -> None:
        """Free a slot; its event stays: the next writer waits for copies still reading it."""
        heapq.heappush(self._free, slot)

    def slot(self, slot: int) -> Page:
        """Host views [Hkv, page_size, ...] of one slot, once no copy touches it."""
        self.wait([slot])
        return Page(*(t[slot % self.seg_n] for t in self.segments[slot // self.seg_n]))

    def wait(self, slots: list[int]) -> None:
        """Block the host until the device copies on `slots` are done (before host access)."""
        events = {id(e): e for e in (self._events.pop(s, None) for s in slots) if e is not None}
        for ev in events.values():
            wait_host(ev)

    def wait_all(self) -> None:
        self.wait(list(self._events))

    def copy_runs(self, slots: list[int], sizes: list[int], tokens: Page, at: int, *,
                  into_slots: bool) -> None:
        """Copy pages between slots and a token-axis Page (pages back to back from `at`);
        pages in consecutive slots of one segment move in one copy per tensor. On CUDA the
        copies are issued non_blocking on the current stream, ordered after earlier
        copies on the same slots, and complete asynchronously."""
        dev = tokens[0].device  # `tokens` may be a plain tuple
        whole = dev.type != "cpu" if self.whole_slots is None else self.whole_slots
        if dev.type == "cuda":
            stream = torch.cuda.current_stream(dev)
            for ev in {id(e): e for s in slots if (e := self._events.get(s)) is not None
                       }.values():
                stream.wait_event(ev)  # rule 3: after the slots' earlier copies, on device
            for t in tokens:  # rule 2: allocated elsewhere maybe; used on this stream too
                if t.is_cuda:
                    t.record_stream(stream)
        else:
            self.wait(slots)  # host copies: the device is done with these slots first
        for i, j in self._runs(slots, sizes, whole):
            seg, a = self.segments[slots[i] // self.seg_n], slots[i] % self.seg_n
            for x, t in zip(seg, tokens):
                if whole:
                    self._copy_whole(x[a:a + j - i], t, at, sizes[i:j], into_slots)
                else:
                    self._copy_strided(x, a, t, at, sizes[i:j], into_slots)
            at += sum(sizes[i:j])
        if dev.type == "cuda":
            ev = record(dev)
            for s in slots:
                self._events[s] = ev

    def _runs(self, slots: list[int], sizes: list[int], whole: bool) -> list[tuple[int, int]]:
        """[i, j) ranges of `slots` that are consecutive slots of one segment (strided
        copies: full pages only, since a run is one strided view)."""
        out, i, ps = [], 0, self.ps
        while i < len(slots):
            j = i + 1
            while (j < len(slots) and (whole or sizes[i] == sizes[j] == ps)
                   and slots[j] == slots[j - 1] + 1 and slots[j] % self.seg_n):
                j += 1
            out.append((i, j))
            i = j
        return out

    def _copy_strided(self, x: Tensor, a: int, t: Tensor, at: int, sizes: list[int],
                      into_slots: bool) -> None:
        """Host tokens: one strided copy per run, the slots seen through a transpose."""
        m, ps = len(sizes), self.ps
        if m == 1:
            held, tok = x[a, :, :sizes[0]], t[:, at:at + sizes[0]]
        else:  # slots [m, Hkv, ps, ...] <-> tokens [Hkv, m * ps, ...]
            held, tok = x[a:a + m].transpose(0, 1), t[:, at:at + m * ps].unflatten(1, (m, ps))
        if into_slots:
            held.copy_(tok)
        else:
            tok.copy_(held)

    def _copy_whole(self, held: Tensor, t: Tensor, at: int, sizes: list[int],
                    into_slots: bool) -> None:
        """Device tokens: `held` [m, Hkv, ps, ...] (contiguous: one DMA) <-> the token
        side, rearranged on the device (torch packs a device temporary on this stream)."""
        m, ps = len(sizes), self.ps
        if all(n == ps for n in sizes):
            tok = t[:, at:at + m * ps].unflatten(1, (m, ps)).transpose(0, 1)
            if into_slots:
                held.copy_(tok, non_blocking=True)
            else:
                tok.copy_(held, non_blocking=True)
            return
        blk = t.new_zeros(held.shape)  # a partial page: whole slots, sliced on the device
        if not into_slots:
            blk.copy_(held, non_blocking=True)
        for i, n in enumerate(sizes):
            if into_slots:
                blk[i, :, :n].copy_(t[:, at:at + n])
            else:
                t[:, at:at + n].copy_(blk[i, :, :n])
            at += n
        if into_slots:
            held.copy_(blk, non_blocking=True)

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
