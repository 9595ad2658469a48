"""Cross-rank agreement: detect arguments that differ across ranks before any ring traffic.

Each rank validates its own inputs, then all ranks all-gather one row of int64 words that
encodes every field (ints, bools, floats, strings, dtypes, devices, None and nested
tuples, each self-describing) and whether local validation failed. Every rank then raises
the same error, so a bad input on one rank is an error everywhere instead of a hang, and a
mismatch (different shapes, dtypes, layouts...) is reported with the decoded values of
every rank.

The row also carries the operation's name (`op`), so ranks that disagree about which
operation they are in (one skipped or reordered a call) fail fast with both names instead of
reading each other's fields or hanging; a peer that is frozen, dead or in an operation that
does not agree (a barrier) makes the gather time out with an error naming `op` and the peer.

The row has a fixed capacity (`max_words` words, the same on every rank, or the gather
itself would mismatch). A signature that does not fit is never truncated: its rank marks
the row as overflowing and every rank raises.
"""
from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping, Sequence

import torch

from .comm import Group, control_group, gather_rows, group_rank_world
from .timeouts import CommError

CAPACITY = 128  # words per row after the header; a larger signature raises, never truncates
_OP_WORDS = 4  # the operation's name, shown in a mismatch (first 32 bytes)
# error flag, overflow (needed words), crc of the field names, words used, crc of the op,
# then the op's name: the same length for every op, so any two agree() calls can compare
HEADER = 5 + _OP_WORDS


class OperationMismatchError(CommError):
    """Ranks reached the agreement step of different operations (a rank skipped, added or
    reordered a collective call)."""
_NONE, _INT, _BOOL, _FLOAT, _STR, _SEQ = range(6)


class PeerError(ValueError):
    """Raised by `agree` on the ranks whose own validation passed when other ranks' failed;
    `ranks` lists those ranks (each raised its own error)."""

    def __init__(self, message: str, ranks: list[int]) -> None:
        super().__init__(message)
        self.ranks = ranks


def _encode(v: object, out: list[int]) -> None:
    """Append the words of one value (tag first) to `out`."""
    if v is None:
        out.append(_NONE)
    elif isinstance(v, bool):
        out += [_BOOL, int(v)]
    elif isinstance(v, int):
        if not -2 ** 63 <= v < 2 ** 63:
            raise ValueError(f"agree: the int {v} does not fit in 64 bits")
        out += [_INT, v]
    elif isinstance(v, float):
        out += [_FLOAT, struct.unpack("<q", struct.pack("<d", v))[0]]
    elif isinstance(v, (str, torch.dtype, torch.device)):
        b = str(v).encode()
        b += bytes(-len(b) % 8)
        out += [_STR, len(str(v).encode())]
        out += [int.from_bytes(b[i:i + 8], "little", signed=True) for i in range(0, len(b), 8)]
    elif isinstance(v, (tuple, list, torch.Size)):
        out += [_SEQ, len(v)]
        for x in v:
            _encode(x, out)
    else:
        raise TypeError(f"agree: cannot encode a {type(v).__name__} ({v!r})")


def _decode(words: Sequence[int], i: int) -> tuple[object, int]:
    """The value starting at words[i], and the index after it."""
    tag = words[i]
    if tag == _NONE:
        return None, i + 1
    if tag == _BOOL:
        return bool(words[i + 1]), i + 2
    if tag == _INT:
        return words[i + 1], i + 2
    if tag == _FLOAT:
        return struct.unpack("<d", struct.pack("<q", words[i + 1]))[0], i + 2
    if tag == _STR:
        n, w = words[i + 1], -(-words[i + 1] // 8)
        raw = b"".join(x.to_bytes(8, "little", signed=True) for x in words[i + 2:i + 2 + w])
        return raw[:n].decode(), i + 2 + w
    if tag == _SEQ:
        items, j = [], i + 2
        for _ in range(words[i + 1]):
            x, j = _decode(words, j)
            items.append(x)
        return tuple(items), j
    raise ValueError(f"agree: corrupt row (tag {tag} at word {i})")


def _op_words(op: str) -> list[int]:
    b = op.encode()[:8 * _OP_WORDS].ljust(8 * _OP_WORDS, b"\0")
    return [int.from_bytes(b[i:i + 8], "little", signed=True) for i in range(0, len(b), 8)]


def _op_name(row: Sequence[int]) -> str:
    raw = b"".join(x.to_bytes(8, "little", signed=True) for x in row[5:HEADER])
    return raw.rstrip(b"\0").decode(errors="replace")


def agree(op: str, group: Group, error: BaseException | None, /, *,
          max_words: int = CAPACITY, explain: Mapping[str, str] | None = None,
          **fields: object) -> None:
    """Raise on every rank if any rank failed validation or the fields differ across ranks.

    `fields` (name -> int, bool, float, str, dtype, device, None or a tuple of these) must
    have the same names on every rank; `error` is this rank's own validation error (raised
    here, after the exchange, so that no peer is left waiting). One all-gather of
    `max_words` + `HEADER` int64 words on the CPU (`comm.control_group`: gloo, a twin of an
    NCCL group), so the check never synchronises the host with the GPU. Ranks in different
    operations raise `OperationMismatchError` naming both. `explain` (field name -> what a
    difference means, in the user's terms) replaces the generic "arguments differ" for
    those fields; every rank's value is shown either way.
    """
    _, world = group_rank_world(group)
    if world == 1:
        if error is not None:
            raise error
        return
    words: list[int] = []
    try:
        for v in fields.values():
            _encode(v, words)
    except (TypeError, ValueError) as e:  # a caller's bug: still no rank may hang
        error, words = error or e, []
    need = len(words) if len(words) > max_words else 0
    names = zlib.crc32("\0".join(fields).encode())
    row = [int(error is not None), need, names, len(words) if not need else 0,
           zlib.crc32(op.encode()), *_op_words(op)]
    row += (words if not need else []) + [0] * (max_words - (0 if need else len(words)))
    mine = torch.tensor(row, dtype=torch.int64)
    table = gather_rows(mine, control_group(group), world,
                        op=f"{op} (cross-rank agreement)").tolist()
    if len({t[4] for t in table}) > 1:
        shown = ", ".join(f"rank {r}: {_op_name(t)}" for r, t in enumerate(table))
        raise OperationMismatchError(f"{op}: ranks are in different operations ({shown}): a "
                                     f"rank skipped, added or reordered a call", op=op,
                                     peers=[r for r, t in enumerate(table) if t[4] != row[4]])
    bad = [r for r, t in enumerate(table) if t[0]]
    if bad:
        if error is not None:
            raise error
        raise PeerError(f"{op}: rank(s) {bad} rejected their inputs (see the error raised "
                        f"there); every rank stops so that none waits forever", bad)
    over = [(r, t[1]) for r, t in enumerate(table) if t[1]]
    if over:
        raise ValueError(f"{op}: the cross-rank signature needs {max(n for _, n in over)} "
                         f"words on rank(s) {[r for r, _ in over]}, more than the {max_words} "
                         f"that fit (pass max_words=); nothing was truncated")
    if len({t[2] for t in table}) > 1:
        raise ValueError(f"{op}: ranks passed different field names (a caller's bug)")
    per_rank = []
    for t in table:
        body, vals, i = t[HEADER:HEADER + t[3]], [], 0
        while i < len(body):
            x, i = _decode(body, i)
            vals.append(x)
        per_rank.append(vals)
    diffs, told = [], {}  # told: explanation -> its differing fields (each said once)
    for j, name in enumerate(fields):
        vals = [p[j] for p in per_rank]
        if len({repr(v) for v in vals}) > 1:  # repr: nan equals nan here
            shown = ", ".join(f"rank {r}: {v}" for r, v in enumerate(vals))
            if explain and name in explain:
                told.setdefault(explain[name], []).append(f"{name}: {shown}")
            else:
                diffs.append(f"{name} ({shown})")
    if told or diffs:
        said = [f"{why} ({'; '.join(items)})" for why, items in told.items()]
        plain = ["arguments differ across ranks: " + "; ".join(diffs)] if diffs else []
        raise ValueError(f"{op}: " + "; ".join(said + plain))
