"""Cross-rank agreement: detect arguments that differ across ranks before any ring traffic.

Each rank validates its own inputs, then all ranks all-gather a small integer signature
(shapes, dtype, flags, and whether local validation failed). Every rank then raises, so a
bad input on one rank is an error everywhere instead of a hang, and a mismatch (different
shapes, dtypes, layouts...) is reported with the same message on every rank.
"""
from __future__ import annotations

import struct
from collections.abc import Sequence

import torch

from .comm import Group, gather_rows

_WIDTH = 6  # ints per field: tuples are padded/truncated to this


def float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _row(fields: dict[str, Sequence[int]], error: BaseException | None) -> list[int]:
    row = [0 if error is None else 1]
    for vals in fields.values():
        vals = list(vals)[:_WIDTH - 1]
        row += [len(vals)] + vals + [0] * (_WIDTH - 1 - len(vals))
    return row


def agree(op: str, fields: dict[str, Sequence[int]], error: BaseException | None,
          group: Group, world: int, device: torch.device,
          labels: dict[str, Sequence[str]] | None = None) -> None:
    """Raise on every rank if any rank failed validation or the fields differ across ranks.

    `fields` must have the same keys on every rank; `error` is this rank's own validation
    error (raised here, after the exchange, so that no peer is left waiting). `labels`
    names the codes of enum-like fields (dtype, layout...) in the message.
    """
    if world == 1:
        if error is not None:
            raise error
        return
    mine = torch.tensor(_row(fields, error), dtype=torch.int64, device=device)
    table = gather_rows(mine, group, world).cpu().tolist()
    bad = [r for r, row in enumerate(table) if row[0]]
    if bad:
        if error is not None:
            raise error
        raise ValueError(f"{op}: rank(s) {bad} rejected their inputs (see the error raised "
                         f"there); every rank stops so that none waits forever")
    diffs = []
    for i, name in enumerate(fields):
        lo = 1 + i * _WIDTH
        vals = [tuple(row[lo + 1: lo + 1 + row[lo]]) for row in table]
        if len(set(vals)) > 1:
            names = (labels or {}).get(name)
            shown = ", ".join(f"rank {r}: {_show(v, names)}" for r, v in enumerate(vals))
            diffs.append(f"{name} ({shown})")
    if diffs:
        raise ValueError(f"{op}: arguments differ across ranks: " + "; ".join(diffs))


def _show(v: tuple[int, ...], names: Sequence[str] | None) -> str:
    if names is not None and len(v) == 1 and 0 <= v[0] < len(names):
        return str(names[v[0]])
    return str(v[0]) if len(v) == 1 else str(v)
