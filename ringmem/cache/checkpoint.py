"""Save and load a whole `ShardedKVCache` (every rank's shard), to resume a long document
without prefilling it again (`ShardedKVCache.save` / `ShardedKVCache.load`).

A checkpoint is a directory of generations (`ringmem.generations`): a save writes every
rank's shard into a new generation and one manifest switch commits all of them, so a save
that fails on any rank (full disk, bad input) leaves the previous checkpoint current and
whole. Each rank writes its shard with `persist.save_shard` (checksummed records): per
layer the hot pools (k, v, pos, score), the demoted tier pages and pending entries
(`tiers.pages.TieredPages.export`) and the eviction coordinator's observation window; the
JSON state carries the page tables, the replicated per-rank counts, the positions each
rank holds of each windowed layer (`WindowTracker.state`), the config fields the manifest
does not (windows included), and the coordinator's counters. Loading verifies every file,
then that model id, layout, world size, rank, dtype, dims, page size, capacity, windows,
eviction policy and tiers match, then that all ranks loaded the same replicated state.
Both are collective: an error on any rank (bad file, mismatch, full disk) is raised on
every rank.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import generations
from ..arguments import check_flag
from .tiers.persist import Shard, load_shard, save_shard

if TYPE_CHECKING:
    from .parts import Parts


def _model_id(model_id: object) -> str:
    if not isinstance(model_id, str) or not model_id:
        raise ValueError(f"model_id must be a non-empty str, got {model_id!r}")
    return model_id


def _replicated_crc(cache: Parts) -> int:
    """CRC of the state every rank holds alike (ranks of different saves differ here)."""
    i = cache.index.state()
    rep = [i["seen"], i["head_counts"], i["split"], cache.windows.state()]
    return zlib.crc32(json.dumps(rep).encode())


def _shown(saved: object) -> str | None:
    """A shard's "saved as" [directory, state CRC] as one line (None: saved before it was
    recorded); a long path keeps its tail, where the generation is."""
    if not isinstance(saved, list) or len(saved) != 2:
        return None
    where = str(saved[0])
    where = where if len(where) <= 160 else "..." + where[-157:]
    return f"{where} (state {int(saved[1]):08x})"


def _config_state(cache: Parts) -> dict[str, Any]:
    c = cache.config
    sig = None if cache.eviction is None else list(cache.eviction.policy.signature())
    return {"q_heads": c.q_heads, "capacity": c.capacity, "max_seqs": c.max_seqs,
            "windows": [c.window(i) for i in range(c.num_layers)], "eviction": sig}


def save_cache(cache: Parts, root: str | Path, *, model_id: str,
               fsync: bool = True) -> Path:
    """Write every rank's shard as a new generation of `root` and switch to it atomically
    across ranks (collective, `generations.save`); returns this rank's shard manifest."""
    def prepare() -> tuple[dict[str, Any], list[dict]]:
        _model_id(model_id)
        check_flag("fsync", fsync)
        c, st = cache.config, cache.stores
        layers = [{"k": s.k, "v": s.v, "pos": s.pos, "score": s.score} for s in st]
        tiers = []
        if cache.tiers is not None:
            for i, layer in enumerate(layers):
                tensors, state = cache.tiers.export(i, c.max_seqs)
                layer.update(tensors)
                tiers.append(state)
        ev = None
        if cache.eviction is not None:
            ev = cache.eviction.state()
            for i, layer in enumerate(layers):
                layer.update(cache.eviction.obs.export(i))
        meta = {"model_id": model_id, "layout": c.layout, "world_size": cache.world,
                "rank": cache.rank, "dtype": c.dtype, "num_layers": c.num_layers,
                "kv_heads": c.kv_heads, "head_dim": c.head_dim, "page_size": c.page_size,
                "tables": [s.tables for s in st], "hlens": [s.hlens for s in st],
                "offsets": [s.off for s in st],
                "seen": cache.index.seen,
                "state": {"config": _config_state(cache), "free": [s.free_list for s in st],
                          "lens": [s.lens for s in st], "store_split": [s.split for s in st],
                          "head_counts": cache.index.head_counts,
                          "split": cache.index.split, "windows": cache.windows.state(),
                          "tiers": tiers or None, "eviction": ev}}
        return meta, layers

    def write(gen: Path, staged: tuple[dict[str, Any], list[dict]]) -> Path:
        # which save wrote this shard, the same on every rank: a load of files from
        # different saves then says so in these terms
        staged[0]["state"]["saved as"] = [str(gen.resolve()), _replicated_crc(cache)]
        return save_shard(gen, *staged, fsync=fsync)

    return generations.save(root, write, group=cache.group, op="ShardedKVCache.save",
                            prepare=prepare, fsync=fsync, model_id=str(model_id))


def load_cache(cache: Parts, root: str | Path, *, model_id: str) -> None:
    """Fill a freshly built cache from the generation `root`'s manifest names (collective).
    A checkpoint from before generations (rank<r>.json directly under root) also loads."""
    def _read(gen: Path) -> Shard:
        c = cache.config
        expect = {"model_id": _model_id(model_id), "layout": c.layout,
                  "world_size": cache.world, "rank": cache.rank, "dtype": c.dtype,
                  "num_layers": c.num_layers, "kv_heads": c.kv_heads,
                  "head_dim": c.head_dim, "page_size": c.page_size}
        return load_shard(gen, expect, device=cache.device)

    saved: list[object] = [None]  # the shard's "saved as", kept by read()

    def read(gen: Path) -> None:
        shard = _read(gen)
        saved[0] = shard.meta["state"].get("saved as")
        _restore(cache, shard.meta, shard.layers)

    mixed = (f"the shard files under {root} come from different saves (each rank's file "
             f"names the save that wrote it: directory and state CRC); restore every rank's "
             f"files from one save")
    generations.load(root, read, group=cache.group, op="ShardedKVCache.load",
                     legacy=lambda r: (r / f"rank{cache.rank:05d}.json").exists(),
                     fields=lambda _: {"saved as": _shown(saved[0]),
                                       "replicated state crc": _replicated_crc(cache)},
                     explain={"saved as": mixed, "replicated state crc": mixed})


def _restore(cache: Parts, m: dict[str, Any], layers: list[dict]) -> None:
    x = m["state"]
    want = _config_state(cache)
    # a checkpoint from before windows were saved had none (windowed caches were refused)
    saved_config = {"windows": [-1] * cache.config.num_layers, **x["config"]}
    for field, saved in saved_config.items():
        if saved != want[field]:
            raise ValueError(f"checkpoint: {field} is {saved!r}, this cache has "
                             f"{want[field]!r}")
    demoted = (any(t["pages"] or any(t["next_id"]) for t in x["tiers"] or ())
               or any(k.startswith("pend") for layer in layers for k in layer))
    if demoted and cache.tiers is None:
        raise ValueError("checkpoint holds demoted pages: build the cache with tiers=")
    for i, (s, layer) in enumerate(zip(cache.stores, layers)):
        for name in ("k", "v", "pos", "score"):
            getattr(s, name).copy_(layer[name])
        s.load_tables(m["tables"][i], m["hlens"][i], x["lens"][i], x["store_split"][i],
                      x["free"][i], m["offsets"][i])
        if x["tiers"] is not None and cache.tiers is not None:
            cache.tiers.restore(i, cache.config.max_seqs, layer, x["tiers"][i])
    cache.index.load_state({"seen": m["seen"], "head_counts": x["head_counts"],
                            "split": x["split"]})
    if x.get("windows") is not None:  # same windows, world and max_seqs: checked above
        cache.windows.load_state(x["windows"])
    ev, co = x["eviction"], cache.eviction
    if ev is not None and co is not None:
        co.load_state(ev)
        for i, layer in enumerate(layers):
            co.obs.restore(i, layer)
