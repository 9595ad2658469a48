"""`DiskFiles`: the disk tier's page files, one checksummed record per page (`records`).

Reads are verified into reusable staging buffers (`staging.StagingPool`, pinned where
CUDA is, so the copy on to the device is a DMA). A page demoted from the device is copied
non_blocking into a staging buffer and written to its file once that copy has landed: at
the next `settle` (the store's next demotion), or at once when something needs the file.
Until then the page is held by the pending buffer and counts as on disk.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from .host import Page
from .records import path_error, read_page, write_page
from .staging import Event, StagingPool, record, wait_host
from .summaries import PageKey

_HEADER = 4096  # room for a record's prefix, JSON header and alignment padding
_ALIGN = 64


class DiskFiles:
    """Page files under `dir` for pages of [kv_heads, n <= page_size, head_dim] `dtype`.
    `page_bytes`: bytes of a full page's tensors; pin: pin the staging buffers; fsync:
    sync every page file and its directory. Not thread-safe: the store's lock guards it."""

    def __init__(self, dir: Path, *, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 page_bytes: int, pin: bool, fsync: bool) -> None:
        self.dir, self.fsync = dir, fsync
        self.kv_heads, self.head_dim, self.dtype = kv_heads, head_dim, dtype
        dir.mkdir(parents=True, exist_ok=True)
        self.staging = StagingPool(page_bytes + _HEADER, pin=pin)
        # page checksums run here, overlapped with the file writes
        self._crc_pool: ThreadPoolExecutor | None = ThreadPoolExecutor(
            1, thread_name_prefix="ringmem-crc")
        # key -> (views of its staging buffer, the buffer, the copy's event)
        self._pending: dict[PageKey, tuple[Page, Tensor, Event]] = {}
        self.defer: bool | None = None
        """Write through staging, later: None = pages on an accelerator; True = every page
        from the hot tier (checks that path on CPU)."""

    def path(self, key: PageKey) -> Path:
        return self.dir / f"L{key[0]}_S{key[1]}_P{key[2]}.page"

    def write(self, key: PageKey, page: Page, *, hot: bool = True) -> None:
        """Store `page` (k, v [Hkv, n, D], pos, score [Hkv, n], any device) as `key`'s file:
        host pages now, device pages once their copy to staging has landed. hot: the page
        comes from the hot tier (False: from a host slot, always written now)."""
        dev = page.k.device
        if not (dev.type != "cpu" if self.defer is None else self.defer and hot):
            self._write(key, page)
            return
        buf = self.staging.take()
        views = self._views(buf, page.k.shape[1])
        if dev.type == "cuda":  # rule 2: read on this stream, wherever it was allocated
            stream = torch.cuda.current_stream(dev)
            for t in page:
                if t.is_cuda:
                    t.record_stream(stream)
        for dst, src in zip(views, page):
            dst.copy_(src, non_blocking=True)  # device -> pinned, contiguous: one DMA each
        self._pending[key] = (views, buf, record(dev))

    def _write(self, key: PageKey, page: Page) -> None:
        try:
            write_page(self.path(key), key, page._asdict(), fsync=self.fsync,
                       checksum_pool=self._crc_pool)
        except OSError as e:  # the operation too: which page, from which tier
            raise path_error(e, f"disk tier: spilling page (layer {key[0]}, seq {key[1]}, "
                                f"page {key[2]})") from e

    def settle(self, keys: list[PageKey] | None = None) -> None:
        """Write pending pages out: those of `keys` (waiting for their copies), or with
        None every one whose copy has already landed (no wait)."""
        todo = list(self._pending) if keys is None else [k for k in keys if k in self._pending]
        for key in todo:
            views, buf, ev = self._pending[key]
            if keys is None and ev is not None and not ev.query():
                continue
            wait_host(ev)  # rule 1: the bytes are read on the host only once they landed
            self._write(key, views)
            del self._pending[key]
            self.staging.give(buf, None)

    def read(self, key: PageKey) -> tuple[Page, Tensor]:
        """Read and verify `key`'s file into a staging buffer: (views of it, the buffer).
        Hand the buffer back with `release` once the copies out of it are issued."""
        self.settle([key])  # still in staging: written first, so every read is verified
        buf = self.staging.take()
        try:
            return Page(**read_page(self.path(key), key, self.dtype, self.kv_heads,
                                    self.head_dim, buffer=buf)), buf
        except BaseException:
            self.staging.give(buf, None)
            raise

    def release(self, buf: Tensor, device: torch.device) -> None:
        """Return a `read` buffer; the copies out of it were just issued for `device`."""
        self.staging.give(buf, record(device))

    def readahead(self, keys: list[PageKey]) -> None:
        """Ask the kernel to start reading these pages' files, so the drive works while
        earlier pages are verified and copied."""
        if not hasattr(os, "posix_fadvise"):
            return
        for key in keys:
            try:  # a hint only: a missing file is reported by the read itself
                fd = os.open(self.path(key), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def remove(self, key: PageKey, *, missing_ok: bool = False) -> None:
        """Delete `key`'s file (or drop its pending copy). missing_ok: a file already gone
        (removed underneath the store) is not an error."""
        if key in self._pending:
            _, buf, ev = self._pending.pop(key)
            self.staging.give(buf, ev)
            return
        self.path(key).unlink(missing_ok=missing_ok)

    def close(self) -> None:
        """Remove the directory (its pages must be removed first). Files or the directory
        already removed underneath (a cleaned scratch disk) are fine: they were scratch."""
        self.staging.wait_all()
        if self._crc_pool is not None:
            self._crc_pool.shutdown()
            self._crc_pool = None
        try:
            for tmp in self.dir.glob("*.tmp"):  # a write cut short
                tmp.unlink(missing_ok=True)
            self.dir.rmdir()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise OSError(f"disk tier: cannot remove {self.dir} ({e.strerror}): it holds "
                          f"files the store did not write") from e

    def _views(self, buf: Tensor, n: int) -> Page:
        """A page of n slots laid out in `buf`: each tensor contiguous, 64-byte aligned."""
        out, at, hn = [], 0, (self.kv_heads, n)
        for dt, shape in ((self.dtype, hn + (self.head_dim,)),
                          (self.dtype, hn + (self.head_dim,)),
                          (torch.int64, hn), (torch.float32, hn)):
            nbytes = torch.Size(shape).numel() * dt.itemsize
            out.append(buf[at:at + nbytes].view(dt).view(shape))
            at += nbytes + -nbytes % _ALIGN
        return Page(*out)
