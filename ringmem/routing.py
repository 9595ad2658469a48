"""Who computes what at each ring step, and which rows/keys travel (pure, cached).

Both schedules share one shape. The *moving* side (K/V for `kv`, Q for `q`) travels one hop
backward per step (rank r -> r-1), so at step i rank r holds the moving side of owner r+i
and computes it against its own stationary side. A travelling buffer carries only the span
of rows (Q) or keys (K/V) that its remaining holders need; under zigzag that trims it to
half once the ring wraps. Results that belong to the moving side (out/lse for `q`; dq for
`q`, dk/dv for `kv` in the backward) return straight to their owner.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .masking import Piece, block_pieces

Span = tuple[int, int]  # [lo, hi) of rows or keys


@dataclass(frozen=True)
class Geometry:
    layout: str
    world: int
    q_lens: tuple[int, ...]   # local query length of each rank
    kv_lens: tuple[int, ...]  # local key length of each rank
    causal: bool
    moving: str  # "q" or "kv": which side travels

    def __post_init__(self) -> None:
        if self.moving not in ("q", "kv"):
            raise ValueError(f"moving must be 'q' or 'kv', got {self.moving!r}")
        if len(self.q_lens) != self.world or len(self.kv_lens) != self.world:
            raise ValueError(f"need one q and kv length per rank, got {self.q_lens}, "
                             f"{self.kv_lens} for world {self.world}")
        if self.causal and (len(set(self.q_lens + self.kv_lens)) != 1):
            raise ValueError(f"causal blocks need equal local lengths on every rank, got q "
                             f"{self.q_lens} and kv {self.kv_lens}")

    @classmethod
    def uniform(cls, layout: str, world: int, q_len: int, kv_len: int, causal: bool,
                moving: str) -> Geometry:
        return cls(layout, world, (q_len,) * world, (kv_len,) * world, causal, moving)


def _side(p: Piece, side: str) -> slice:
    return p.q if side == "q" else p.k


def span_of(pieces: tuple[Piece, ...], side: str) -> Span | None:
    if not pieces:
        return None
    sl = [_side(p, side) for p in pieces]
    return min(s.start for s in sl), max(s.stop for s in sl)


@lru_cache(maxsize=8192)
def step_block(geo: Geometry, rank: int, step: int) -> tuple[int, int, tuple[Piece, ...]]:
    """(query owner, key owner, pieces) of the block `rank` computes at `step`."""
    m = (rank + step) % geo.world
    qo, ko = (rank, m) if geo.moving == "kv" else (m, rank)
    return qo, ko, block_pieces(geo.layout, geo.world, qo, geo.q_lens[qo], ko,
                                geo.kv_lens[ko], geo.causal)


@lru_cache(maxsize=8192)
def used(geo: Geometry, rank: int, step: int) -> Span | None:
    """Span of the moving side that `rank` touches at `step` (None: no work)."""
    return span_of(step_block(geo, rank, step)[2], geo.moving)


@lru_cache(maxsize=8192)
def held(geo: Geometry, owner: int, step: int) -> Span | None:
    """Span of `owner`'s moving side that its holder at `step` receives: what that holder
    and every later holder need (None: nothing travels)."""
    if step == 0:
        return 0, (geo.q_lens if geo.moving == "q" else geo.kv_lens)[owner]
    spans = [used(geo, (owner - s) % geo.world, s) for s in range(step, geo.world)]
    spans = [s for s in spans if s is not None]
    if not spans:
        return None
    return min(s[0] for s in spans), max(s[1] for s in spans)


def split_rows(pieces: tuple[Piece, ...], at: int) -> tuple[tuple[Piece, ...], tuple[Piece, ...]]:
    """Split pieces into query rows < at and >= at (a causal square splits into a smaller
    causal square, and a full block plus a causal square)."""
    first: list[Piece] = []
    second: list[Piece] = []
    for p in pieces:
        a, b = p.q.start, p.q.stop
        if b <= at:
            first.append(p)
        elif a >= at:
            second.append(p)
        elif not p.causal:
            first.append(Piece(slice(a, at), p.k, False))
            second.append(Piece(slice(at, b), p.k, False))
        else:
            mid = p.k.start + (at - a)
            first.append(Piece(slice(a, at), slice(p.k.start, mid), True))
            second.append(Piece(slice(at, b), slice(p.k.start, mid), False))
            second.append(Piece(slice(at, b), slice(mid, p.k.stop), True))
    return tuple(first), tuple(second)
