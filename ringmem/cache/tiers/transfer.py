"""Asynchronous page moves: start a recall (or demotion) now, use its pages later.

`TransferEngine`: one background worker thread runs a `TierStore`'s moves in submission
order, so a prefetch issued after a demotion sees it. On CUDA the worker issues its copies
non_blocking on a side stream and records an event after them; it never waits for the
device (host slots and staging buffers carry their own events, see `staging`). `wait`
waits for the worker's host work only (file reads, checksums, issuing), then orders the
caller's stream after the copies on the device and tells the allocator the tensors are
used there. On CPU the worker's file reads, checksums and copies release the GIL and
overlap the caller's compute (matmuls) on the other cores.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from .host import Page
from .store import TierStore
from .summaries import PageKey


@dataclass
class Transfer:
    """Handle of a transfer in flight; pass it to `TransferEngine.wait`."""
    future: Future
    kind: str
    keys: list[PageKey]


class TransferEngine:
    """Runs a TierStore's recalls and demotions in the background.

    `device`: the hot device pages are recalled to. Use one engine per store; methods are
    called from one thread (the model's). Until a demotion's handle is waited on, its
    k/v must not be modified (they are still being read)."""

    def __init__(self, store: TierStore, device: str | torch.device | None = None) -> None:
        if not isinstance(store, TierStore):
            raise TypeError(f"store must be a TierStore, got {type(store).__name__}")
        self.store = store
        self.device = torch.device(store.hot_device if device is None else device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and not torch.cuda.is_available():
            raise ValueError(f"device {self.device} requested but CUDA is not available")
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ringmem-tiers")

    def prefetch(self, keys: list[PageKey], out: Page | None = None) -> Transfer:
        """Start recalling `keys` (copies; the store keeps them) to the hot device: into
        new tensors, or with `out` into those preallocated buffers (`recall_into`; leave
        them alone until `wait`, and double-buffer to overlap consecutive layers)."""
        keys = list(keys)
        if out is not None:
            if self.cuda:  # written on the side stream: not to be recycled before that
                for t in out:
                    t.record_stream(self._stream)
            return self._submit("recall_into", keys,
                                lambda: self.store.recall_into(keys, out))
        return self._submit("recall", keys, lambda: self.store.recall(keys, self.device))

    def demote(self, key: PageKey, k: Tensor, v: Tensor, pos: Tensor,
               score: Tensor | None = None) -> Transfer:
        """Start demoting one page (as `TierStore.demote`, tensors on the hot device). Its
        summary is taken now, on the caller's stream, so page selection sees it at once."""
        self.store.add_summary(key, k, pos)
        try:
            if self.cuda:  # the side stream reads these: keep them from being recycled early
                for t in (k, v, pos, score):
                    if t is not None:
                        t.record_stream(self._stream)
            return self._submit("demote", [key], lambda: self._demote(key, k, v, pos, score))
        except BaseException:
            self.store.summaries.remove(key)
            raise

    def _demote(self, key: PageKey, k: Tensor, v: Tensor, pos: Tensor,
                score: Tensor | None) -> None:
        try:
            self.store.demote(key, k, v, pos, score, summarize=False)
        except BaseException:  # not stored (store full, bad input): drop its summary too
            if key in self.store.summaries and self.store.tier_of(key) is None:
                self.store.summaries.remove(key)
            raise

    def wait(self, handle: Transfer) -> list[Page] | list[int] | None:
        """Block until the worker has run `handle`; the recalled pages (their lengths for a
        prefetch into `out`, None for a demotion), ready for work on the caller's current
        stream (on CUDA the copies may still be running: that stream waits for them, the
        host does not). Re-raises the transfer's error (e.g. PageCorruptError)."""
        if not isinstance(handle, Transfer):
            raise TypeError(f"handle must be a Transfer, got {type(handle).__name__}")
        out, done = handle.future.result()
        if self.cuda:
            cur = torch.cuda.current_stream(self.device)
            cur.wait_event(done)
            for page in out if handle.kind == "recall" else ():
                for t in page:
                    t.record_stream(cur)  # allocated on the side stream, used on this one
        return out

    def close(self) -> None:
        """Finish queued transfers and stop the worker."""
        self._pool.shutdown(wait=True)

    def __enter__(self) -> TransferEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _submit(self, kind: str, keys: list[PageKey], fn: Callable[[], Any]) -> Transfer:
        ready = None
        if self.cuda:  # the side stream must see everything queued so far on the caller's
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        return Transfer(self._pool.submit(self._run, fn, ready), kind, keys)

    def _run(self, fn: Callable[[], Any], ready: Any) -> tuple[Any, Any]:
        if not self.cuda:
            return fn(), None
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            self._stream.wait_event(ready)
            out = fn()
            done = torch.cuda.Event()
            done.record(self._stream)
        # no host wait: the host memory these copies use is guarded by its own events, the
        # device tensors by record_stream, and consumers wait for `done` on the device
        return out, done
