"""Checksummed tensor records on disk: the format of demoted pages and checkpoint files.

A record is one file: a 16-byte prefix (magic, CRC-32 of all that follows it, header
length), a JSON header (caller metadata plus each tensor's name, dtype, shape and
offset) padded so the payload starts 64-byte aligned, then the tensors' raw bytes (bf16
included: bytes are read and written through the tensor's own memory, never numpy). It is
written to a temporary name and renamed into place, and every read checks magic, length and
CRC, raising `PageCorruptError` naming the file. The disk tier stores one page per record
(`write_page` / `read_page`).
"""
from __future__ import annotations

import ctypes
import json
import os
import struct
import zlib
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from ...generations import fsync_dir

DTYPE_NAMES = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16",
               torch.bfloat16: "bfloat16", torch.int64: "int64"}
NAME_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}
_MAGIC = b"RMREC001"
_PREFIX = struct.Struct("<8sII")  # magic, crc32 of everything after itself, header len
_CRC_FROM = 12
_ALIGN = 64


class PageCorruptError(ValueError):
    """A stored page or checkpoint file failed verification: its data is not trusted."""


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
    try:
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
    except OSError as e:  # a full disk says which file, and leaves no partial one behind
        tmp.unlink(missing_ok=True)
        raise path_error(e, f"cannot write {path}") from e
    return crc


def path_error(e: OSError, what: str) -> OSError:
    """`e` re-made to say what was being done to which file (errno kept, so callers can
    still test for ENOSPC; the OSError subclass follows the errno)."""
    why = e.strerror or str(e) or type(e).__name__
    return OSError(e.errno, f"{what}: {why}") if e.errno else OSError(f"{what}: {why}")


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
