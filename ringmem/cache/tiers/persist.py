"""Verified files on disk: checksummed tensor records, and whole cache-shard checkpoints.

A record is one file: a 16-byte prefix (magic, CRC-32 of all that follows it, header
length), a JSON header (caller metadata plus each tensor's name, dtype, shape and
offset) padded so the payload starts 64-byte aligned, then the tensors' raw bytes (bf16
included: bytes are read and written through the tensor's own memory, never numpy). It is
written to a temporary name and renamed into place, and every read checks magic, length and
CRC, raising `PageCorruptError` naming the file. The disk tier stores one page per record
(`write_page` / `read_page`).

A shard checkpoint (`save_shard` / `load_shard`) is what one rank needs to resume a long
document without prefilling it again: `<root>/rank<r>.json` (the manifest, the commit point,
replaced atomically) and one record per layer under `<root>/rank<r>/<save id>/`. Loading
checks the manifest's own CRC, then that model id, layout, world size, rank, dtype (and any
other field the caller expects) match, then every record, then that the positions held are
the ones the manifest describes.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import struct
import uuid
import zlib
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

FORMAT, VERSION = "ringmem.kv_shard", 1
IDENTITY = ("model_id", "layout", "world_size", "rank", "dtype", "num_layers", "kv_heads",
            "head_dim", "page_size")
"""Manifest fields compared with the caller's expectation on load."""
BOOKKEEPING = ("tables", "hlens", "seen")
"""Per (layer, seq) page bookkeeping every checkpoint carries (see save_shard)."""
REQUIRED_EXPECT = ("model_id", "layout", "world_size", "rank", "dtype")
DTYPE_NAMES = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16",
               torch.bfloat16: "bfloat16", torch.int64: "int64"}
NAME_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}
_MAGIC = b"RMREC001"
_PREFIX = struct.Struct("<8sII")  # magic, crc32 of everything after itself, header len
_CRC_FROM = 12
_ALIGN = 64


class PageCorruptError(ValueError):
    """A stored page or checkpoint file failed verification: its data is not trusted."""


class Shard(NamedTuple):
    meta: dict[str, Any]
    """The manifest's fields (dtype as a torch.dtype): identity, tables, hlens, seen, state."""
    layers: list[dict[str, Tensor]]
    """Per layer: the tensors given to save_shard (k, v, pos, ...)."""


def raw_bytes(t: Tensor) -> memoryview:
    """Writable zero-copy view of a contiguous CPU tensor's bytes. The tensor must outlive
    the view (the view does not keep it alive)."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"raw_bytes needs a contiguous CPU tensor, got device {t.device}, "
                         f"contiguous={t.is_contiguous()}")
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------ records
def write_record(path: str | Path, meta: Mapping[str, Any], tensors: Mapping[str, Tensor],
                 *, fsync: bool = False, checksum_pool: Executor | None = None) -> int:
    """Write tensors (any device; dtypes of DTYPE_NAMES) and JSON metadata to `path`
    atomically. fsync: also sync the file and its directory. checksum_pool: compute the
    CRC there, overlapped with the writes. Returns the record's CRC-32."""
    path = Path(path)
    parts = [t.detach().contiguous().cpu() for t in tensors.values()]
    index, off = [], 0
    for name, t in zip(tensors, parts):
        if t.dtype not in DTYPE_NAMES:
            raise TypeError(f"tensor {name!r} has unsupported dtype {t.dtype}")
        off += -off % _ALIGN
        nbytes = t.numel() * t.element_size()
        index.append({"name": name, "dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                      "offset": off, "nbytes": nbytes})
        off += nbytes
    header = json.dumps({"meta": dict(meta), "tensors": index, "payload_bytes": off}).encode()
    header += b" " * (-(_PREFIX.size + len(header)) % _ALIGN)
    chunks: list[memoryview | bytes] = []
    at = 0
    for entry, t in zip(index, parts):
        chunks.append(bytes(entry["offset"] - at))  # alignment padding
        chunks.append(raw_bytes(t))
        at = entry["offset"] + entry["nbytes"]
    parts_crc = [struct.pack("<I", len(header)), header, *chunks]
    # the checksum can run on another thread while the bytes are written (both release
    # the GIL); it is patched into the prefix before the file gets its final name
    crc_job = checksum_pool.submit(_crc32, parts_crc) if checksum_pool else None
    crc = None if crc_job else _crc32(parts_crc)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(_PREFIX.pack(_MAGIC, crc or 0, len(header)))
        f.write(header)
        for c in chunks:
            f.write(c)
        if crc_job:
            crc = crc_job.result()
            f.seek(len(_MAGIC))
            f.write(struct.pack("<I", crc))
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic: the final name only ever holds a whole record
    if fsync:
        fsync_dir(path.parent)
    return crc


def read_record(path: str | Path, *, pin_memory: bool = False, buffer: Tensor | None = None
                ) -> tuple[dict[str, Any], dict[str, Tensor], int]:
    """(meta, tensors, crc) of a record, verified; tensors are CPU views of one buffer:
    `buffer` (uint8, reused by the caller) when it is large enough, else a new one."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise PageCorruptError(f"file {path} is missing") from None
    buf = (buffer[:size] if buffer is not None and buffer.numel() >= size
           else torch.empty(size, dtype=torch.uint8, pin_memory=pin_memory))
    mv = raw_bytes(buf)
    with open(path, "rb") as f:
        got = f.readinto(mv)
    if got != size:
        raise PageCorruptError(f"file {path}: read {got} of {size} bytes")
    if size < _PREFIX.size:
        raise PageCorruptError(f"file {path} is truncated: {size} bytes, shorter than its "
                               f"{_PREFIX.size}-byte prefix")
    magic, crc, hlen = _PREFIX.unpack(mv[:_PREFIX.size])
    if magic != _MAGIC:
        raise PageCorruptError(f"file {path} is corrupt: bad magic {bytes(magic)!r}")
    start = _PREFIX.size + hlen
    head = _header(mv, start)
    expected = start + int(head["payload_bytes"]) if head else None
    actual = zlib.crc32(mv[_CRC_FROM:])  # header length, header and payload
    if actual != crc or size != expected:
        if expected is not None and size < expected or size < start:
            raise PageCorruptError(f"file {path} is truncated: {size} bytes, its header "
                                   f"describes {expected or start}")
        raise PageCorruptError(f"file {path} is corrupt: CRC-32 {actual:#010x} != stored "
                               f"{crc:#010x}")
    del mv
    tensors = {}
    for e in head["tensors"]:  # offsets are 64-byte aligned, so every dtype view is legal
        lo = start + e["offset"]
        t = buf[lo:lo + e["nbytes"]].view(NAME_DTYPES[e["dtype"]])
        tensors[e["name"]] = t.view(e["shape"])
    return head["meta"], tensors, crc


def _crc32(parts: Sequence[bytes | memoryview]) -> int:
    crc = 0
    for x in parts:
        crc = zlib.crc32(x, crc)
    return crc


def _header(mv: memoryview, start: int) -> dict[str, Any] | None:
    """The parsed JSON header, or None when it is cut off or unreadable."""
    try:
        head = json.loads(bytes(mv[_PREFIX.size:start])) if start <= len(mv) else None
        return head if isinstance(head, dict) and isinstance(
            head.get("payload_bytes"), int) else None
    except ValueError:
        return None


def write_page(path: Path, key: tuple[int, int, int], page: Mapping[str, Tensor], *,
               fsync: bool = False, checksum_pool: Executor | None = None) -> None:
    """One disk-tier page: k, v [Hkv, n, D], pos, score [Hkv, n] as a record."""
    meta = {"layer": key[0], "seq": key[1], "page": key[2], "n": page["k"].shape[1]}
    write_record(path, meta, page, fsync=fsync, checksum_pool=checksum_pool)


def read_page(path: Path, key: tuple[int, int, int], dtype: torch.dtype, kv_heads: int,
              head_dim: int, *, buffer: Tensor | None = None, pin_memory: bool = False
              ) -> dict[str, Tensor]:
    """Read, verify and check a `write_page` file: it must hold page `key` with these
    dtype and dims (a valid file under the wrong name is an error too)."""
    meta, t, _ = read_record(path, pin_memory=pin_memory, buffer=buffer)
    n = meta.get("n")
    want = {"layer": key[0], "seq": key[1], "page": key[2]}
    want_t = {"k": (dtype, (kv_heads, n, head_dim)), "v": (dtype, (kv_heads, n, head_dim)),
              "pos": (torch.int64, (kv_heads, n)), "score": (torch.float32, (kv_heads, n))}
    if ({f: meta.get(f) for f in want} != want or set(t) != set(want_t)
            or any((t[x].dtype, t[x].shape) != w for x, w in want_t.items())):
        got = {x: (str(y.dtype), tuple(y.shape)) for x, y in t.items()}
        raise PageCorruptError(f"page file {path} does not hold page {key} ({dtype}, "
                               f"[{kv_heads}, n, {head_dim}]): header {meta}, tensors {got}")
    return t


# ------------------------------------------------------------------------ checkpoints
def save_shard(root: str | Path, meta: Mapping[str, Any],
               layers: Sequence[Mapping[str, Tensor]], *, fsync: bool = True) -> Path:
    """Checkpoint one rank's cache shard under `root`; returns the manifest path.

    meta: model_id (str), layout (str), world_size, rank, num_layers, kv_heads, head_dim,
    page_size (ints), dtype (torch.dtype); the page bookkeeping of each (layer, seq):
    tables [L][S] -> page ids, hlens [L][S][Hkv] -> tokens each KV head holds (packed in
    table order), seen [L][S] -> the sequence's next global position; and optional `state`
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
                **{k: m[k] for k in (*IDENTITY, *BOOKKEEPING)}, "dtype": DTYPE_NAMES[m["dtype"]],
                "state": m.get("state"), "positions": positions, "files": files}
    manifest["crc32"] = _manifest_crc(manifest)
    path = root / f"rank{m['rank']:05d}.json"
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)  # the commit point: before it the old checkpoint stays whole
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
    data = root / f"rank{rank:05d}"
    layers = []
    for i, f in enumerate(man["files"]):
        meta, tensors, crc = read_record(data / f["name"])
        if crc != f["crc32"] or meta.get("layer") != i or meta.get("save_id") != man["save_id"]:
            raise PageCorruptError(f"file {data / f['name']} is not the layer {i} record of "
                                   f"save {man['save_id']} (stale or swapped file)")
        layers.append(tensors)
    out = {**man, "dtype": NAME_DTYPES[man["dtype"]]}
    got = _positions(_check_meta(out, layers), layers)
    for i, (a, b) in enumerate(zip(got, man["positions"])):
        for s, (x, y) in enumerate(zip(a, b)):
            if x != y:
                raise PageCorruptError(f"checkpoint {path}: positions of layer {i} seq {s} "
                                       f"{x} differ from the manifest's {y}")
    dev = torch.device(device)
    if dev.type != "cpu":
        layers = [{k: t.to(dev) for k, t in layer.items()} for layer in layers]
    return Shard(out, layers)


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
        for s, (table, hl) in enumerate(zip(m["tables"][i], m["hlens"][i])):
            if (len(hl) != hkv or len(table) != -(-max(hl) // ps)
                    or any(not 0 <= p < slots // ps for p in table)):
                raise ValueError(f"layer {i} seq {s}: page table {table} does not fit "
                                 f"hlens={hl} ({hkv} heads) with {slots // ps} pages of {ps}")
    return m


def _positions(m: Mapping[str, Any], layers: Sequence[Mapping[str, Tensor]]
               ) -> list[list[dict[str, Any]]]:
    """Check every (layer, seq, head)'s positions; return [layer][seq] {count, crc32}."""
    ps, out = m["page_size"], []
    for i, layer in enumerate(layers):
        pos = layer["pos"].cpu()
        pos = pos.expand(m["kv_heads"], -1) if pos.dim() == 1 else pos
        row = []
        for s, (table, hl, seen) in enumerate(zip(m["tables"][i], m["hlens"][i],
                                                   m["seen"][i])):
            pages = torch.tensor(table, dtype=torch.int64).reshape(-1, 1)
            slots = (pages * ps + torch.arange(ps)).flatten()
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
