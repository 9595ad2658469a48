"""Damage a saved cache checkpoint on purpose (the checkpoint-fault tests)."""
from __future__ import annotations

from pathlib import Path

from ringmem.generations import current


def flip_record_byte(root: Path, rank: int, layer: int) -> None:
    """Flip one bit near the end of `rank`'s record of `layer` in the current generation."""
    rec = next(current(root).glob(f"rank{rank:05d}/*/layer{layer:05d}.rec"))
    raw = bytearray(rec.read_bytes())
    raw[-3] ^= 0x10
    rec.write_bytes(raw)
