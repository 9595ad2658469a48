"""Content keys of prefilled document caches: what a saved cache depends on, hashed.

    fields = key_fields(token_ids=ids, model_id="org/model", model_revision=rev,
                        layout="stripe", world_size=2, dtype=torch.bfloat16,
                        policy=policy.signature(), extra={"chunk": 4096, "page_size": 256})
    key = content_key(**same arguments)        # sha256 hex of fields' canonical JSON

Two runs get the same key exactly when every input that shapes the cache is the same: the
token ids (their int64 bytes, hashed), the model and its revision, layout, world size,
dtype, the eviction policy and budget, and `extra` (chunk size, page size, windows...).
`model_revision(path)` fingerprints a local transformers checkpoint without reading it all.
"""
from __future__ import annotations

import array
import hashlib
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

KEY_VERSION = 1  # bump when the fields or their encoding change: old entries then miss
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
_EDGE = 1 << 20  # bytes hashed at each end of a weight file


def _token_bytes(token_ids: object) -> tuple[int, bytes]:
    """(count, little-endian int64 bytes) of a 1-D sequence or tensor of token ids."""
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dtype.is_floating_point or token_ids.dtype.is_complex \
                or token_ids.dtype == torch.bool:
            raise TypeError(f"token_ids must hold integers, got a {token_ids.dtype} tensor")
        ids = token_ids.detach().reshape(-1).to("cpu", torch.int64).tolist()
    elif isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, Iterable):
        raise TypeError(f"token_ids must be a sequence or tensor of ints, got "
                        f"{type(token_ids).__name__}")
    else:
        ids = list(token_ids)
        bad = next((t for t in ids if not isinstance(t, int) or isinstance(t, bool)), None)
        if bad is not None:
            raise TypeError(f"token_ids must hold ints, got {bad!r} ({type(bad).__name__})")
    if not ids:
        raise ValueError("token_ids must not be empty")
    try:
        a = array.array("q", ids)
    except OverflowError:
        raise ValueError("token_ids holds a value outside int64") from None
    if sys.byteorder == "big":
        a.byteswap()
    return len(ids), a.tobytes()


def _json(name: str, value: object) -> Any:
    """`value` as plain JSON data (tuples become lists); TypeError naming the argument."""
    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be JSON-serialisable (str, int, float, bool, None, "
                        f"lists, dicts with str keys), got {value!r}: {e}") from None


def key_fields(*, token_ids: object, model_id: str, model_revision: str, layout: str,
               world_size: int, dtype: torch.dtype | str, policy: object,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The readable form of a content key: every field that `content_key` hashes.

    token_ids: 1-D ints (list or tensor), kept as their count and sha256; policy: any
    JSON-able value (e.g. `EvictionPolicy.signature()`, or None: no eviction); extra: any
    other option that changes the cache (chunk size, page size, windows, ...).
    """
    for name, val in (("model_id", model_id), ("model_revision", model_revision),
                      ("layout", layout)):
        if not isinstance(val, str) or not val:
            raise ValueError(f"{name} must be a non-empty str, got {val!r}")
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not isinstance(dtype, (torch.dtype, str)) or not str(dtype):
        raise TypeError(f"dtype must be a torch.dtype or its name, got {dtype!r}")
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict or None, got {type(extra).__name__}")
    n, raw = _token_bytes(token_ids)
    dt = str(dtype)
    return {"version": KEY_VERSION, "tokens": n,
            "tokens_sha256": hashlib.sha256(raw).hexdigest(), "model_id": model_id,
            "model_revision": model_revision, "layout": layout, "world_size": world_size,
            "dtype": dt if dt.startswith("torch.") else f"torch.{dt}",
            "policy": _json("policy", policy), "extra": _json("extra", extra or {})}


def fields_key(fields: dict[str, Any]) -> str:
    """The sha256 hex of `fields`' canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def content_key(*, token_ids: object, model_id: str, model_revision: str, layout: str,
                world_size: int, dtype: torch.dtype | str, policy: object,
                extra: dict[str, Any] | None = None) -> str:
    """The content key (64 hex digits) of a document cache; arguments as `key_fields`."""
    return fields_key(key_fields(token_ids=token_ids, model_id=model_id,
                                 model_revision=model_revision, layout=layout,
                                 world_size=world_size, dtype=dtype, policy=policy,
                                 extra=extra))


def _edges(path: Path, size: int) -> bytes:
    """sha256 of a file's first and last `_EDGE` bytes (and of its safetensors header,
    which names every tensor's dtype, shape and offsets, whatever its length)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(_EDGE)
        h.update(head)
        if path.suffix == ".safetensors" and len(head) >= 8:
            n = int.from_bytes(head[:8], "little")
            if _EDGE < 8 + n <= size:  # a header longer than the head: read the rest
                h.update(f.read(8 + n - _EDGE))
        if size > _EDGE:
            f.seek(max(size - _EDGE, _EDGE))
            h.update(f.read())
    return h.digest()


def model_revision(path: Path | str) -> str:
    """A cheap fingerprint (sha256 hex) of a local transformers checkpoint directory:
    config.json's bytes and each weight file's name, size and the hash of its first and last
    MiB (plus the full safetensors header). Reads a few MiB per file, never the weights."""
    root = Path(path)
    config = root / "config.json"
    if not config.is_file():
        raise ValueError(f"model path {root} is not a checkpoint directory ({config} "
                         f"missing)")
    weights = sorted(p for p in root.iterdir()
                     if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not weights:
        raise ValueError(f"model path {root} holds no weight file (one of "
                         f"{', '.join(WEIGHT_SUFFIXES)})")
    h = hashlib.sha256(b"ringmem.model_revision/1\0")
    h.update(hashlib.sha256(config.read_bytes()).digest())
    for p in weights:
        size = p.stat().st_size
        h.update(f"{p.name}\0{size}\0".encode())
        h.update(_edges(p, size))
    return h.hexdigest()
