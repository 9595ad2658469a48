"""Whole cache-shard checkpoints (`save_shard` / `load_shard`), made of verified records
(`records.py`).

A shard checkpoint is what one rank needs to resume a long document without prefilling it
again: `<root>/rank<r>.json` (the manifest, this rank's commit point, replaced atomically)
and one record per layer under `<root>/rank<r>/<save id>/`. `ShardedKVCache.save` puts the
shards of all ranks into one generation directory (`ringmem.generations`), committed for
all ranks at once. Loading checks the manifest's own CRC,
then that model id, layout, world size, rank, dtype (and any other field the caller
expects) match, then every record, then that the positions held are the ones the manifest
describes.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
import zlib
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

from ...generations import fsync_dir
from .records import (
    DTYPE_NAMES,
    NAME_DTYPES,
    PageCorruptError,
    raw_bytes,
    read_record,
    write_record,
)

FORMAT, VERSION = "ringmem.kv_shard", 1
IDENTITY = ("model_id", "layout", "world_size", "rank", "dtype", "num_layers", "kv_heads",
            "head_dim", "page_size")
"""Manifest fields compared with the caller's expectation on load."""
BOOKKEEPING = ("tables", "hlens", "seen")
"""Per (layer, seq) page bookkeeping every checkpoint carries (see save_shard)."""
REQUIRED_EXPECT = ("model_id", "layout", "world_size", "rank", "dtype")


class Shard(NamedTuple):
    meta: dict[str, Any]
    """The manifest's fields (dtype as a torch.dtype): identity, tables, hlens, seen, state."""
    layers: list[dict[str, Tensor]]
    """Per layer: the tensors given to save_shard (k, v, pos, ...)."""


def save_shard(root: str | Path, meta: Mapping[str, Any],
               layers: Sequence[Mapping[str, Tensor]], *, fsync: bool = True) -> Path:
    """Checkpoint one rank's cache shard under `root`; returns the manifest path.

    meta: model_id (str), layout (str), world_size, rank, num_layers, kv_heads, head_dim,
    page_size (ints), dtype (torch.dtype); the page bookkeeping of each (layer, seq):
    tables [L][S] -> page ids, hlens [L][S][Hkv] -> tokens each KV head holds (packed in
    table order, from slot offsets[L][S] of the first page: optional, default 0), seen
    [L][S] -> the sequence's next global position; and optional `state`
    (any JSON: per-rank counts, free page lists, ...), returned as saved.
    layers[i]: k, v [Hkv, slots, D], pos [Hkv, slots] (or [slots]) int64, plus any other
    tensors (score). Checked: each head's positions in each sequence are distinct and lie
    in [0, seen).
    """
    m = _check_meta(meta, layers)
    positions = _positions(m, layers)
    root = Path(root)
    save_id = uuid.uuid4().hex[:12]
    data = root / f"rank{m['rank']:05d}"
    (data / save_id).mkdir(parents=True)
    files = []
    for i, layer in enumerate(layers):
        name = f"{save_id}/layer{i:05d}.rec"
        crc = write_record(data / name, {"layer": i, "save_id": save_id}, layer, fsync=fsync)
        files.append({"name": name, "crc32": crc})
    manifest = {"format": FORMAT, "version": VERSION, "save_id": save_id,
                **{k: m[k] for k in (*IDENTITY, *BOOKKEEPING, "offsets")},
                "dtype": DTYPE_NAMES[m["dtype"]],
                "state": m.get("state"), "positions": positions, "files": files}
    manifest["crc32"] = _manifest_crc(manifest)
    path = root / f"rank{m['rank']:05d}.json"
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(manifest, f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)  # this rank's commit point (`generations`: all ranks at once)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not leave a partial manifest behind
        raise
    if fsync:
        fsync_dir(root)
    for old in data.iterdir():  # earlier saves, and leftovers of interrupted ones
        if old.name != save_id:
            shutil.rmtree(old)
    return path


def load_shard(root: str | Path, expect: Mapping[str, Any], *,
               device: str | torch.device = "cpu") -> Shard:
    """Load and verify the checkpoint of rank `expect["rank"]` under `root`.

    expect: model_id, layout, world_size, rank, dtype are required; any other IDENTITY
    field, and next_positions (each sequence's next global position, i.e. the document
    tokens already processed, in every layer) are checked when given. A mismatch raises
    ValueError naming the field; damaged files raise PageCorruptError (a ValueError)
    naming the file.
    """
    missing = [k for k in REQUIRED_EXPECT if k not in expect]
    if missing:
        raise ValueError(f"expect must give {REQUIRED_EXPECT}; missing {missing}")
    rank = expect["rank"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"expect['rank'] must be a non-negative int, got {rank!r}")
    root = Path(root)
    path = root / f"rank{rank:05d}.json"
    man = _read_manifest(path, root, rank)
    _check_identity(path, man, expect)
    data = root / f"rank{rank:05d}"
    layers = []
    for i, f in enumerate(man["files"]):
        meta, tensors, crc = read_record(data / f["name"])
        if crc != f["crc32"] or meta.get("layer") != i or meta.get("save_id") != man["save_id"]:
            raise PageCorruptError(f"file {data / f['name']} is not the layer {i} record of "
                                   f"save {man['save_id']} (stale or swapped file)")
        layers.append(tensors)
    out = _check_meta({**man, "dtype": NAME_DTYPES[man["dtype"]]}, layers)
    got = _positions(out, layers)
    for i, (a, b) in enumerate(zip(got, man["positions"])):
        for s, (x, y) in enumerate(zip(a, b)):
            if x != y:
                raise PageCorruptError(f"checkpoint {path}: positions of layer {i} seq {s} "
                                       f"{x} differ from the manifest's {y}")
    dev = torch.device(device)
    if dev.type != "cpu":
        layers = [{k: t.to(dev) for k, t in layer.items()} for layer in layers]
    return Shard(out, layers)


def _read_manifest(path: Path, root: Path, rank: int) -> dict[str, Any]:
    """The verified manifest of one rank (CRC, format and version checked)."""
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint for rank {rank} under {root} ({path} missing)")
    try:
        man = json.loads(path.read_text())
        ok = man.pop("crc32", None) == _manifest_crc(man)
    except (ValueError, TypeError, AttributeError) as e:
        raise PageCorruptError(f"manifest {path} is corrupt: unreadable ({e})") from None
    if not ok:
        raise PageCorruptError(f"manifest {path} is corrupt: CRC-32 mismatch")
    if man.get("format") != FORMAT or man.get("version") != VERSION:
        raise ValueError(f"manifest {path}: format {man.get('format')!r} version "
                         f"{man.get('version')!r}, this ringmem reads {FORMAT!r} {VERSION}")
    return man


def _check_identity(path: Path, man: dict[str, Any], expect: Mapping[str, Any]) -> None:
    """The manifest's identity fields and next positions equal what the loader expects."""
    for field in IDENTITY:
        want = expect.get(field, man[field])
        want = DTYPE_NAMES.get(want, want) if field == "dtype" else want
        if man[field] != want:
            raise ValueError(f"checkpoint {path}: {field} is {man[field]!r}, expected "
                             f"{want!r}")
    if "next_positions" in expect:
        for i, seen in enumerate(man["seen"]):
            if seen != list(expect["next_positions"]):
                raise ValueError(f"checkpoint {path}: positions do not match: layer {i} "
                                 f"holds next_positions {seen} (tokens processed per "
                                 f"sequence), expected {list(expect['next_positions'])}")


def _manifest_crc(man: Mapping[str, Any]) -> int:
    return zlib.crc32(json.dumps(man, sort_keys=True).encode())


def _check_meta(meta: Mapping[str, Any], layers: Sequence[Mapping[str, Tensor]]
                ) -> dict[str, Any]:
    """Types and cross-consistency of checkpoint metadata and tensors (ValueError naming
    the field)."""
    m = dict(meta)
    for f in (*IDENTITY, *BOOKKEEPING):
        if f not in m:
            raise ValueError(f"meta is missing {f!r}")
    # a checkpoint from before offsets: every sequence starts at its first page's start
    m["offsets"] = m.get("offsets") or [[0] * len(t) for t in m["tables"]]
    for f in ("model_id", "layout"):
        if not isinstance(m[f], str):
            raise ValueError(f"meta[{f!r}] must be a str, got {m[f]!r}")
    for f in ("world_size", "rank", "num_layers", "kv_heads", "head_dim", "page_size"):
        low = 0 if f == "rank" else 1
        if isinstance(m[f], bool) or not isinstance(m[f], int) or m[f] < low:
            raise ValueError(f"meta[{f!r}] must be an int >= {low}, got {m[f]!r}")
    if m["rank"] >= m["world_size"]:
        raise ValueError(f"meta['rank']={m['rank']} is not below world_size={m['world_size']}")
    if m["dtype"] not in DTYPE_NAMES or m["dtype"] == torch.int64:
        raise ValueError(f"meta['dtype'] must be a floating torch.dtype, got {m['dtype']!r}")
    n, hkv, d, ps = m["num_layers"], m["kv_heads"], m["head_dim"], m["page_size"]
    for f in BOOKKEEPING:
        if len(m[f]) != n:
            raise ValueError(f"meta[{f!r}] has {len(m[f])} layers, num_layers is {n}")
    if len(layers) != n:
        raise ValueError(f"{len(layers)} layers of tensors given, num_layers is {n}")
    for i, layer in enumerate(layers):
        k, v, pos = (layer.get(x) for x in ("k", "v", "pos"))
        if not all(isinstance(t, Tensor) for t in (k, v, pos)):
            raise ValueError(f"layer {i} must hold tensors 'k', 'v' and 'pos'")
        if k.dtype != m["dtype"] or v.dtype != m["dtype"]:
            raise ValueError(f"layer {i}: k/v dtype {k.dtype}/{v.dtype}, meta says dtype "
                             f"{m['dtype']}")
        slots = k.shape[1] if k.dim() == 3 else -1
        if (k.shape != (hkv, slots, d) or v.shape != k.shape or slots % ps
                or pos.shape not in ((hkv, slots), (slots,)) or pos.dtype != torch.int64):
            raise ValueError(f"layer {i}: k, v must be [{hkv}, slots, {d}] with slots a "
                             f"multiple of page_size {ps}, pos int64 [{hkv}, slots] or "
                             f"[slots]; got {tuple(k.shape)}, {tuple(v.shape)}, "
                             f"{pos.dtype} {tuple(pos.shape)}")
        seqs = len(m["tables"][i])
        if len(m["hlens"][i]) != seqs or len(m["seen"][i]) != seqs:
            raise ValueError(f"layer {i}: tables, hlens and seen must cover the same "
                             f"{seqs} sequences")
        offs = m["offsets"][i]
        if len(offs) != seqs or not all(isinstance(o, int) and 0 <= o < ps for o in offs):
            raise ValueError(f"layer {i}: offsets must give each of the {seqs} sequences an "
                             f"int in [0, {ps}), got {offs!r}")
        for s, (table, hl, off) in enumerate(zip(m["tables"][i], m["hlens"][i], offs)):
            if (len(hl) != hkv or len(table) != -(-(off + max(hl)) // ps) * bool(max(hl))
                    or any(not 0 <= p < slots // ps for p in table)):
                raise ValueError(f"layer {i} seq {s}: page table {table} does not fit "
                                 f"hlens={hl} ({hkv} heads) from offset {off} with "
                                 f"{slots // ps} pages of {ps}")
    return m


def _positions(m: Mapping[str, Any], layers: Sequence[Mapping[str, Tensor]]
               ) -> list[list[dict[str, Any]]]:
    """Check every (layer, seq, head)'s positions; return [layer][seq] {count, crc32}."""
    ps, out = m["page_size"], []
    for i, layer in enumerate(layers):
        pos = layer["pos"].cpu()
        pos = pos.expand(m["kv_heads"], -1) if pos.dim() == 1 else pos
        row = []
        for s, (table, hl, seen, off) in enumerate(zip(m["tables"][i], m["hlens"][i],
                                                        m["seen"][i], m["offsets"][i])):
            pages = torch.tensor(table, dtype=torch.int64).reshape(-1, 1)
            slots = (pages * ps + torch.arange(ps)).flatten()[off:]
            held = [pos[h, slots[:n]] for h, n in enumerate(hl)]
            for h, p in enumerate(held):
                if p.numel() and (int(p.min()) < 0 or int(p.max()) >= seen):
                    raise ValueError(f"positions of layer {i} seq {s} head {h} must lie in "
                                     f"[0, {seen}) (seen), got {int(p.min())}..{int(p.max())}")
                if p.unique().numel() != p.numel():
                    raise ValueError(f"positions of layer {i} seq {s} head {h} repeat a token")
            flat = torch.cat(held) if held else torch.zeros(0, dtype=torch.int64)
            row.append({"count": list(hl), "crc32": zlib.crc32(raw_bytes(flat.contiguous()))})
        out.append(row)
    return out
