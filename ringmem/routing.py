"""Who computes what at each ring step, and which rows/keys travel (pure, cached).

Both schedules share one shape. The *moving* side (K/V for `kv`, Q for `q`) travels one hop
per step in the direction `hop` (+1: rank r -> r-1, so at step i rank r holds the moving
side of owner r+i; -1: the other way round) and is computed against the holder's own
stationary side. A mask that only looks back a short way (a causal sliding window) picks
the direction that reaches its few needed owners first, and everything after them is
empty: nothing computed, nothing sent. A travelling buffer carries only the span
of rows (Q) or keys (K/V) that its remaining holders need; under zigzag that trims it to
half once the ring wraps. Results that belong to the moving side (out/lse for `q`; dq for
`q`, dk/dv for `kv` in the backward) return straight to their owner.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .masking import Mask, Piece, block_pieces

Span = tuple[int, int]  # [lo, hi) of rows or keys


@dataclass(frozen=True)
class Geometry:
    layout: str
    world: int
    q_lens: tuple[int, ...]   # local query length of each rank
    kv_lens: tuple[int, ...]  # local key length of each rank
    mask: Mask
    moving: str  # "q" or "kv": which side travels
    hop: int = 1  # +1: the moving side goes r -> r-1 (holds owner r+i at step i); -1: r -> r+1
    fold: int = 1  # layout shards per rank (a Ulysses group's union, `layouts.positions`)
    fetch: bool = False  # all-gather: each holder fetches what it uses straight from the owner

    @property
    def causal(self) -> bool:
        return self.mask.causal

    def __hash__(self) -> int:
        # a key of every routing cache, hashed r^2 times per plan: computed once, not per
        # lookup (its length tuples grow with the ring)
        return self._hash  # type: ignore[attr-defined]

    def __post_init__(self) -> None:
        if isinstance(self.mask, bool):
            object.__setattr__(self, "mask", Mask(causal=self.mask))
        object.__setattr__(self, "_hash", hash((
            self.layout, self.world, self.q_lens, self.kv_lens, self.mask, self.moving,
            self.hop, self.fold, self.fetch)))
        if self.hop not in (1, -1):
            raise ValueError(f"hop must be +1 or -1, got {self.hop!r}")
        if self.moving not in ("q", "kv"):
            raise ValueError(f"moving must be 'q' or 'kv', got {self.moving!r}")
        if len(self.q_lens) != self.world or len(self.kv_lens) != self.world:
            raise ValueError(f"need one q and kv length per rank, got {self.q_lens}, "
                             f"{self.kv_lens} for world {self.world}")
        if not self.mask.plain or self.causal:
            if len(set(self.q_lens + self.kv_lens)) != 1:
                raise ValueError(f"masks over positions need equal local lengths on every "
                                 f"rank, got q {self.q_lens} and kv {self.kv_lens}")

    @classmethod
    def uniform(cls, layout: str, world: int, q_len: int, kv_len: int, mask: Mask | bool,
                moving: str, hop: int = 1, fold: int = 1, fetch: bool = False) -> Geometry:
        return cls(layout, world, (q_len,) * world, (kv_len,) * world, mask, moving, hop,
                   fold, fetch)

    def owner(self, rank: int, step: int) -> int:
        """Whose moving side `rank` holds at `step`."""
        return (rank + self.hop * step) % self.world

    def holder(self, owner: int, step: int) -> int:
        """Who holds `owner`'s moving side at `step`."""
        return (owner - self.hop * step) % self.world


def _side(p: Piece, side: str) -> slice:
    return p.q if side == "q" else p.k


def span_of(pieces: tuple[Piece, ...], side: str) -> Span | None:
    if not pieces:
        return None
    sl = [_side(p, side) for p in pieces]
    return min(s.start for s in sl), max(s.stop for s in sl)


@lru_cache(maxsize=1 << 16)
def step_block(geo: Geometry, rank: int, step: int) -> tuple[int, int, tuple[Piece, ...]]:
    """(query owner, key owner, pieces) of the block `rank` computes at `step`."""
    m = geo.owner(rank, step)
    qo, ko = (rank, m) if geo.moving == "kv" else (m, rank)
    return qo, ko, block_pieces(geo.layout, geo.world, qo, geo.q_lens[qo], ko,
                                geo.kv_lens[ko], geo.mask, geo.fold)


@lru_cache(maxsize=1 << 16)
def used(geo: Geometry, rank: int, step: int) -> Span | None:
    """Span of the moving side that `rank` touches at `step` (None: no work)."""
    return span_of(step_block(geo, rank, step)[2], geo.moving)


@lru_cache(maxsize=8192)
def held(geo: Geometry, owner: int, step: int) -> Span | None:
    """Span of `owner`'s moving side that its holder at `step` receives: what that holder
    and every later holder need (None: nothing travels). A fetch carries only what that
    holder uses."""
    if geo.fetch and step > 0:
        return used(geo, geo.holder(owner, step), step)
    if step == 0:
        return 0, (geo.q_lens if geo.moving == "q" else geo.kv_lens)[owner]
    return _later_use(geo, owner)[step]


@lru_cache(maxsize=1 << 14)
def _later_use(geo: Geometry, owner: int) -> tuple[Span | None, ...]:
    """Per step s: the span of `owner`'s moving side that its holders at s and after use
    (one backward pass: a ring of r ranks costs r, not r^2, per owner)."""
    out: list[Span | None] = [None] * (geo.world + 1)
    acc: Span | None = None
    for s in range(geo.world - 1, 0, -1):
        u = used(geo, geo.holder(owner, s), s)
        if u is not None:
            acc = u if acc is None else (min(acc[0], u[0]), max(acc[1], u[1]))
        out[s] = acc
    return tuple(out)


def last_step(geo: Geometry) -> int:
    """The last step at which any rank computes (later steps are empty everywhere)."""
    return max((s for s in range(geo.world) for r in range(geo.world)
                if step_block(geo, r, s)[2]), default=0)


@lru_cache(maxsize=1024)
def best_hop(layout: str, world: int, q_len: int, kv_len: int, mask: Mask,
             moving: str, fold: int = 1) -> int:
    """The ring direction that finishes soonest: +1 unless a window makes the other
    direction reach every needed block in fewer steps (ties: +1, today's direction)."""
    if mask.window == (-1, -1) or world <= 2:
        return 1
    last = {h: last_step(Geometry.uniform(layout, world, q_len, kv_len, mask, moving, h,
                                          fold)) for h in (1, -1)}
    return -1 if last[-1] < last[1] else 1


def split_rows(pieces: tuple[Piece, ...], at: int) -> tuple[tuple[Piece, ...], tuple[Piece, ...]]:
    """Split pieces into query rows < at and >= at (a causal square splits into a smaller
    causal square, and a full block plus a causal square; a band shifts its offsets)."""
    first: list[Piece] = []
    second: list[Piece] = []
    for p in pieces:
        a, b = p.q.start, p.q.stop
        if b <= at:
            first.append(p)
        elif a >= at:
            second.append(p)
        elif p.causal:
            mid = p.k.start + (at - a)
            first.append(Piece(slice(a, at), slice(p.k.start, mid), None, 0, p.b))
            second.append(Piece(slice(at, b), slice(p.k.start, mid), b=p.b))
            second.append(Piece(slice(at, b), slice(mid, p.k.stop), None, 0, p.b))
        else:
            shift = lambda x, by=at - a: None if x is None else x + by
            first.append(Piece(slice(a, at), p.k, p.lo, p.hi, p.b))
            second.append(Piece(slice(at, b), p.k, shift(p.lo), shift(p.hi), p.b))
    return tuple(first), tuple(second)
