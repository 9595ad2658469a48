"""Host staging for the tiers' copies between host and device, and the rules that keep
those copies asynchronous and safe.

On CUDA every tier copy between host and device is a `non_blocking=True` copy whose host
end is pinned and contiguous (one DMA, no hidden pageable temporary), issued on some
stream, with an event recorded right after it. Lifetime rules, each enforced where the
memory lives:

1. Host buffers: a pinned buffer that a copy reads or writes is not rewritten, reused,
   freed or read on the host before that copy's event has completed (`wait_host`). Host
   slots keep one event per slot (`HostPool`), staging buffers one per buffer
   (`StagingPool`), the step's readback buffer one (`Readback`).
2. Device tensors: what a copy reads (a demoted page) or writes (recall outputs) stays
   alive until the copy has run: it is used on the stream that allocated it, or marked
   with `record_stream` for the copying stream, so the caching allocator holds its memory
   back. Its owner does not modify it before the copy's event (a `Transfer`: until `wait`;
   a flushed page: nobody else holds it).
3. Ordering: device work that consumes a copy waits for its event on the device
   (`wait_event`), never on the host. The host waits only for buffers it is about to read
   or reuse, after asking `query()` first, so a finished copy costs no wait at all.

On CPU there are no events (None): copies are synchronous and every wait is a no-op.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable

import torch
from torch import Tensor

Event = Any
"""A `torch.cuda.Event`, or None where nothing is in flight (CPU)."""


def record(device: torch.device) -> Event:
    """An event recorded now on `device`'s current stream, after the copies just issued
    there; None off CUDA."""
    if device.type != "cuda":
        return None
    ev = torch.cuda.Event()
    ev.record(torch.cuda.current_stream(device))
    return ev


def wait_host(event: Event) -> None:
    """Block the host until `event` has completed (None: nothing to wait for). Asks
    first: an event that is done costs no synchronisation."""
    if event is not None and not event.query():
        event.synchronize()


class StagingPool:
    """Reusable contiguous host byte buffers of `nbytes` each (pinned when `pin`): disk
    pages on their way to the device, device pages on their way to disk.

    `take` hands out a buffer whose last copy has completed (rule 1); `give` takes it
    back with the event of the copy still reading or writing it (None: none). A steady
    stream of transfers reuses the same few buffers and allocates nothing."""

    def __init__(self, nbytes: int, *, pin: bool, keep: int = 4) -> None:
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 1:
            raise ValueError(f"nbytes must be a positive int, got {nbytes!r}")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be a positive int, got {keep!r}")
        self.nbytes, self.pin, self.keep = nbytes, pin, keep
        self._free: deque[tuple[Tensor, Event]] = deque()  # oldest first
        self.allocations = 0
        """Buffers allocated so far (reuse shows as a count that stops growing)."""

    def take(self) -> Tensor:
        """A contiguous uint8 buffer of `nbytes` that no copy touches any more."""
        for i, (buf, ev) in enumerate(self._free):
            if ev is None or ev.query():
                del self._free[i]
                return buf
        if len(self._free) >= self.keep:  # every kept buffer is busy: wait for the oldest
            buf, ev = self._free.popleft()
            wait_host(ev)
            return buf
        self.allocations += 1
        return torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=self.pin)

    def give(self, buf: Tensor, event: Event) -> None:
        """Return `buf`; `event`: the copy still using it (None: none)."""
        if len(self._free) < self.keep:
            self._free.append((buf, event))
        else:  # not kept: freed only once no copy uses it
            wait_host(event)

    def wait_all(self) -> None:
        """Wait for every copy still using a kept buffer."""
        for _, ev in self._free:
            wait_host(ev)


class Readback:
    """The decode step's one device->host read: small int64 results (the pages a query
    selected, a NaN flag) copied non_blocking into a reused pinned buffer, and waited for
    only when the host needs the values. On CPU the values are read at once."""

    def __init__(self, *, pin: bool) -> None:
        self.pin = pin
        self._buf: Tensor | None = None
        self._event: Event = None  # the read still writing `_buf`

    def start(self, t: Tensor) -> Callable[[], list[int]]:
        """Begin reading the int64 vector `t`; returns the function that waits for it and
        gives its values (call it as late as possible)."""
        if t.dtype != torch.int64 or t.dim() != 1:
            raise ValueError(f"t must be a 1-D int64 tensor, got {t.dtype} {tuple(t.shape)}")
        if t.device.type != "cuda":
            vals = t.tolist()
            return lambda: vals
        wait_host(self._event)  # rule 1: an unfinished earlier read still owns the buffer
        n = t.numel()
        if self._buf is None or self._buf.numel() < n:
            self._buf = torch.empty(max(n, 64), dtype=torch.int64, pin_memory=self.pin)
        host = self._buf[:n]
        host.copy_(t, non_blocking=True)  # `t` lives on this stream: safe to drop (rule 2)
        ev = self._event = record(t.device)

        def result() -> list[int]:
            wait_host(ev)  # the one host wait of the step: the values are data-dependent
            return host.tolist()

        return result
