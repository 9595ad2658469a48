"""The collective side of the document cache store: every rank calls these together.

    cache = load_or_none(store, key, config, model_id=m, group=g)   # None: prefill it
    if cache is None:
        cache = ...prefill...
        save_entry(store, key, cache, model_id=m, meta={"tokens": n, "fields": fields})

Only rank 0 of the group touches the store's bookkeeping (lookup, commit, removal); it
tells the others what it found, so every rank takes the same branch. Every rank reads and
writes its own shard under `store.path(key)` (one node: one directory seen by all ranks).
Errors are raised on every rank (through `agree`), so no rank waits for a peer that left.
"""
from __future__ import annotations

import warnings
import zlib
from typing import Any

import torch

from ..agree import PeerError, agree
from ..cache import CacheConfig, ShardedKVCache, TierPolicy
from ..comm import Group, control_group, gather_rows, group_rank_world
from ..eviction.budget import EvictionPolicy
from ..timeouts import CommError
from .store import DocCacheStore, check_key

_LOAD, _SAVE = "DocCacheStore.load_or_none", "DocCacheStore.save_entry"
_EXPLAIN = {"key": "ranks asked for different keys",
            "root": "ranks use different store roots (--dir or RINGMEM_CACHE differ); every "
                    "rank must see one directory"}


def _same(key: str, store: DocCacheStore, error: BaseException | None) -> dict[str, object]:
    """The fields every rank must agree on (none after a local error: it is raised)."""
    if error is not None:
        return {}
    return {"key": key, "root": zlib.crc32(str(store.root.resolve()).encode())}


def _rank0_says(flag: bool, group: Group, op: str) -> bool:
    """Rank 0's `flag`, on every rank (one all-gather of a word per rank)."""
    _, world = group_rank_world(group)
    if world == 1:
        return flag
    row = gather_rows(torch.tensor([int(flag)], dtype=torch.int64), control_group(group),
                      world, op=f"{op} (rank 0's lookup)")
    return bool(row[0, 0].item())


def load_or_none(store: DocCacheStore, key: str, config: CacheConfig, *, model_id: str,
                 group: Group = None, eviction: EvictionPolicy | None = None,
                 tiers: TierPolicy | None = None) -> ShardedKVCache | None:
    """The cache saved under `key`, or None on every rank when there is none (collective).

    Rank 0 looks `key` up (marking it used) and tells the others. On a hit every rank runs
    `ShardedKVCache.load` (config, eviction and tiers as for the cache that was saved).
    A damaged or mismatching entry (load raises ValueError or OSError, on every rank) is
    reported (a RuntimeWarning naming the key and the reason: rank 0's, and each other
    rank's own), removed by rank 0 once every rank has stopped reading it, and None is
    returned on every rank, so the caller prefills again. Anything else a load raises
    (a peer's death or timeout, a bug) is raised on every rank, and the entry is kept.
    """
    rank, _ = group_rank_world(group)
    error, hit = None, False
    try:
        check_key(key)
        hit = rank == 0 and store.lookup(key) is not None
    except Exception as e:  # noqa: BLE001 (raised below, on every rank)
        error = e
    agree(_LOAD, group, error, explain=_EXPLAIN, **_same(key, store, error))
    if not _rank0_says(hit, group, _LOAD):
        return None
    cache, reason, unexpected = None, None, None
    try:
        cache = ShardedKVCache.load(store.path(key), config, model_id=model_id, group=group,
                                    eviction=eviction, tiers=tiers)
    except CommError as e:  # a timeout is an OSError too: a peer is gone, not the files
        unexpected = e
    except (ValueError, OSError) as e:
        reason = e
    except Exception as e:  # noqa: BLE001 (raised below, on every rank)
        unexpected = e
    # every rank has stopped reading the entry; an unexpected error stops every rank
    agree(f"{_LOAD} (after load)", group, unexpected)
    if reason is None:
        return cache
    if rank == 0 or not isinstance(reason, PeerError):
        warnings.warn(f"doc cache entry {key} could not be loaded (rank {rank}: {reason}); "
                      f"{'removing it, ' if rank == 0 else ''}the document is prefilled "
                      f"again", RuntimeWarning, stacklevel=2)
    error = None
    if rank == 0:
        try:
            store.remove(key)
        except Exception as e:  # noqa: BLE001 (raised below, on every rank)
            error = e
    agree(f"{_LOAD} (removed)", group, error)
    return None


def save_entry(store: DocCacheStore, key: str, cache: ShardedKVCache, *, model_id: str,
               meta: dict[str, Any]) -> None:
    """Save `cache` as `key`'s entry and commit it (collective over `cache.group`).

    Rank 0 makes the entry's directory fresh (an old entry under `key` is replaced), every
    rank saves its shard (`ShardedKVCache.save`), then rank 0 commits `meta` (see
    `DocCacheStore.commit`: "tokens" required, "fields" recommended) and removes least
    recently used entries beyond `store.max_bytes`. Returns once every rank is done; an
    error anywhere is raised on every rank and leaves no entry under `key`.
    """
    group = cache.group
    rank, _ = group_rank_world(group)
    error = None
    try:
        check_key(key)
        if rank == 0:
            store.begin(key)
    except Exception as e:  # noqa: BLE001 (raised below, on every rank)
        error = e
    agree(f"{_SAVE} (begin)", group, error, explain=_EXPLAIN, **_same(key, store, error))
    try:
        cache.save(store.path(key), model_id=model_id)
    except BaseException:
        if rank == 0:
            try:
                store.remove(key)
            except OSError as e:  # the save's own error matters more; the next save sweeps
                warnings.warn(f"{_SAVE}: could not remove the failed entry {key}: {e}",
                              RuntimeWarning, stacklevel=2)
        raise
    error = None
    if rank == 0:
        try:
            store.commit(key, meta)
        except Exception as e:  # noqa: BLE001 (raised below, on every rank)
            error = e
            store.remove(key)
    agree(f"{_SAVE} (commit)", group, error)
