"""A content-keyed store of prefilled document caches, reused across runs.

    store = DocCacheStore()                       # <RINGMEM_CACHE or ~/.cache/ringmem>/doc-caches
    key = content_key(token_ids=ids, model_id=..., ...)   # ringmem.jobs.keys
    cache = load_or_none(store, key, config, model_id=m, group=g)  # collective
    if cache is None:
        cache = ...prefill...
        save_entry(store, key, cache, model_id=m, meta={"tokens": n, "fields": fields})

On disk, one directory per entry:

    <root>/<key>/cache/        the `ShardedKVCache.save` checkpoint (a directory of generations)
    <root>/<key>/entry.json    the committed metadata: written last, atomically (tmp + replace)
    <root>/<key>/SAVING.json   while a save runs: the saving process (pid, host)

An entry is found only once entry.json exists, so a save that died never is; its directory
is garbage, swept by `entries()` and `commit()` once its saving process is gone. Removal
renames the directory first (`.trash-*`), so a removed entry vanishes at once.

Concurrency: one node, many ranks. Only one process mutates the store at a time, the
job's rank 0 (`load_or_none` / `save_entry` do that), plus a user's `ringmem cache`
command; their mutations take a file lock (`<root>/.lock`). Other ranks only read the
checkpoint under `path(key)` during a collective load.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from ..demo.models import cache_dir
from ..generations import MANIFEST

ENTRY, SAVING, CACHE = "entry.json", "SAVING.json", "cache"
_KEY = re.compile(r"[0-9a-f]{64}")
_TRASH = ".trash-"
LOCK_TIMEOUT = 60.0  # seconds: a mutation waits this long for another one to finish
STALE_SAVE = 24 * 3600.0  # seconds: an unfinished save older than this is garbage anyway


@dataclass
class Entry:
    """One committed entry: sizes in bytes, times in seconds since the epoch."""
    key: str
    bytes: int
    tokens: int
    created: float
    last_used: float
    fields: dict[str, Any] = field(default_factory=dict)
    """The key's fields in readable form (`keys.key_fields`), as the caller gave them."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Everything the caller passed to `commit`."""


def default_root() -> Path:
    return cache_dir() / "doc-caches"


def check_key(key: object) -> str:
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise ValueError(f"key must be 64 lowercase hex digits (a content_key), got {key!r}")
    return key


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write `path` atomically: a synced temp file renamed over it, then the dir synced."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _alive(marker: Path) -> bool:
    """Whether the save that wrote `marker` may still be running."""
    try:
        m = json.loads(marker.read_text())
        age = time.time() - marker.stat().st_mtime
    except (OSError, ValueError):
        return False
    if age > STALE_SAVE or not isinstance(m, dict):
        return False
    if m.get("host") != socket.gethostname():
        return True  # another host's process: cannot tell, wait for STALE_SAVE
    try:
        os.kill(int(m.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True


class DocCacheStore:
    """Prefilled document caches under `root` (default `<RINGMEM_CACHE or
    ~/.cache/ringmem>/doc-caches`), addressed by content key; `max_bytes` caps the total
    size of committed entries (least recently used go first; None: no cap)."""

    def __init__(self, root: Path | str | None = None, max_bytes: int | None = None) -> None:
        if max_bytes is not None and (not isinstance(max_bytes, int)
                                      or isinstance(max_bytes, bool) or max_bytes < 0):
            raise ValueError(f"max_bytes must be a non-negative int or None, got "
                             f"{max_bytes!r}")
        if root is not None and not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"root must be a path or None, got {type(root).__name__}")
        self.root = Path(root) if root is not None else default_root()
        self.max_bytes = max_bytes

    def __repr__(self) -> str:
        return f"DocCacheStore({str(self.root)!r}, max_bytes={self.max_bytes})"

    # ------------------------------------------------------------ reading
    def path(self, key: str) -> Path:
        """The checkpoint directory of `key`'s entry (what `ShardedKVCache.save` writes)."""
        return self.root / check_key(key) / CACHE

    def _meta(self, key: str) -> dict[str, Any] | None:
        """The committed metadata of `key`, or None (absent, unreadable or not its own)."""
        try:
            m = json.loads((self.root / key / ENTRY).read_text())
        except (OSError, ValueError):
            return None
        ok = isinstance(m, dict) and m.get("key") == key and isinstance(m.get("bytes"), int)
        return m if ok and (self.root / key / CACHE).is_dir() else None

    def lookup(self, key: str) -> Path | None:
        """The checkpoint directory of a committed entry (marked as just used), else None."""
        m = self._meta(check_key(key))
        if m is None:
            return None
        with self._lock():
            m = self._meta(key)  # it may have gone while we waited
            if m is None:
                return None
            m["last_used"] = time.time()
            _write_json(self.root / key / ENTRY, m)
        return self.path(key)

    def entries(self) -> list[Entry]:
        """Every committed entry, most recently used first; sweeps garbage (entries whose
        save died, removals cut short)."""
        if not self.root.is_dir():
            return []
        with self._lock():
            self._sweep(keep=None)
            return self._entries()

    def _entries(self) -> list[Entry]:
        out = []
        for p in self.root.iterdir():
            m = self._meta(p.name) if _KEY.fullmatch(p.name) else None
            if m is not None:
                out.append(Entry(key=p.name, bytes=m["bytes"], tokens=m.get("tokens", 0),
                                 created=m.get("created", 0.0),
                                 last_used=m.get("last_used", 0.0),
                                 fields=m.get("fields") or {}, meta=m.get("meta") or {}))
        return sorted(out, key=lambda e: e.last_used, reverse=True)

    # ------------------------------------------------------------ mutating (one process)
    def begin(self, key: str) -> Path:
        """Make `key`'s entry directory fresh for a save (any old entry removed) and mark it
        as being saved by this process; returns `path(key)`. `save_entry` calls it."""
        d = self.root / check_key(key)
        with self._lock():
            self._discard(d)
            d.mkdir(parents=True)
            _write_json(d / SAVING, {"pid": os.getpid(), "host": socket.gethostname(),
                                     "started": time.time()})
        return d / CACHE

    def commit(self, key: str, meta: dict[str, Any]) -> None:
        """Publish `key`'s entry after its save completed: write entry.json atomically (key,
        `meta["fields"]`, `meta["tokens"]`, bytes on disk, created / last used), then remove
        least recently used entries other than `key` while the total exceeds `max_bytes`.
        `meta`: a JSON-able dict; "tokens" (int) is required, "fields" (the key's fields,
        `keys.key_fields`) recommended; the whole dict is kept as `Entry.meta`."""
        d = self.root / check_key(key)
        if not isinstance(meta, dict):
            raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
        tokens = meta.get("tokens")
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
            raise ValueError(f"meta['tokens'] must be a non-negative int, got {tokens!r}")
        fields = meta.get("fields") or {}
        if not isinstance(fields, dict):
            raise TypeError(f"meta['fields'] must be a dict, got {type(fields).__name__}")
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as e:
            raise TypeError(f"meta must be JSON-serialisable: {e}") from None
        with self._lock():
            if not (d / CACHE / MANIFEST).is_file():
                raise ValueError(f"commit: no saved checkpoint under {d / CACHE} (save "
                                 f"into store.path(key) first)")
            now = time.time()
            record = {"key": key, "tokens": tokens, "fields": fields, "meta": meta,
                      "bytes": _du(d), "created": now, "last_used": now}
            _write_json(d / ENTRY, record)
            (d / SAVING).unlink(missing_ok=True)
            self._sweep(keep=key)
            self._shrink(keep=key)

    def remove(self, key: str) -> bool:
        """Remove `key`'s entry (committed or not); whether there was one."""
        d = self.root / check_key(key)
        with self._lock():
            return self._discard(d)

    def clear(self) -> int:
        """Remove every entry (and garbage); how many committed entries went."""
        if not self.root.is_dir():
            return 0
        with self._lock():
            n = len(self._entries())
            for p in list(self.root.iterdir()):
                if _KEY.fullmatch(p.name) or p.name.startswith(_TRASH):
                    self._discard(p)
            return n

    # ------------------------------------------------------------ internals
    @contextmanager
    def _lock(self) -> Iterator[None]:
        """Hold the store's file lock (another job's rank 0 or `ringmem cache` may mutate)."""
        self.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.root / ".lock"))
        try:
            lock.acquire(timeout=LOCK_TIMEOUT)
        except Timeout:
            raise TimeoutError(f"the doc cache store is locked by another process for over "
                               f"{LOCK_TIMEOUT:.0f} s ({lock.lock_file})") from None
        try:
            yield
        finally:
            lock.release()

    def _discard(self, d: Path) -> bool:
        """Rename `d` out of the way (lookups miss it at once), then delete it."""
        if not d.exists():
            return False
        trash = d.with_name(f"{_TRASH}{d.name[:16]}-{uuid.uuid4().hex[:8]}")
        try:
            os.replace(d, trash)
        except FileNotFoundError:
            return False
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def _sweep(self, keep: str | None) -> None:
        """Remove uncommitted entries whose save is not running, and trash left behind."""
        for p in list(self.root.iterdir()):
            if p.name.startswith(_TRASH):
                shutil.rmtree(p, ignore_errors=True)
            elif (_KEY.fullmatch(p.name) and p.name != keep and self._meta(p.name) is None
                  and not _alive(p / SAVING)):
                self._discard(p)

    def _shrink(self, keep: str) -> None:
        if self.max_bytes is None:
            return
        live = self._entries()
        total = sum(e.bytes for e in live)
        for e in reversed(live):  # least recently used first
            if total <= self.max_bytes:
                break
            if e.key != keep:
                self._discard(self.root / e.key)
                total -= e.bytes

