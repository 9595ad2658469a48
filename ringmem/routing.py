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

import torch
from torch import Tensor

from .layouts import positions
from .masking import Mask, Piece, block_pieces, by_rank_order

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
    ids, classes = block_classes(geo)
    busy = torch.tensor([bool(c) for c in classes])[ids].any(0)
    return int(torch.nonzero(busy).max()) if bool(busy.any()) else 0


@lru_cache(maxsize=64)
def block_classes(geo: Geometry) -> tuple[Tensor, list[tuple[Piece, ...]]]:
    """(class [rank, step] of the block each ring rank computes at each step, each class's
    pieces), for every rank and step at once. Under a plain mask of a rank-ordered layout a
    block depends only on whether its query rank is before, at or after its key rank
    (three classes); under a causal or windowed mask (any translation-invariant one) only
    on how the two ranks' runs of consecutive positions lie relative to each other
    (`_relative_keys`); documents are classified block by block."""
    r = geo.world
    j = torch.arange(r).unsqueeze(1).expand(r, r)
    m = (j + geo.hop * torch.arange(r)) % r
    qo, ko = (j, m) if geo.moving == "kv" else (m, j)
    ql, kl = geo.q_lens[0], geo.kv_lens[0]
    uniform = len(set(geo.q_lens)) == 1 and len(set(geo.kv_lens)) == 1
    pieces = lambda a, b: block_pieces(geo.layout, r, a, geo.q_lens[a], b,  # noqa: E731
                                       geo.kv_lens[b], geo.mask, geo.fold)
    if uniform and geo.mask.plain and not geo.mask.causal:  # every block whole
        return torch.zeros(r, r, dtype=torch.int64), [pieces(0, 0)]
    if uniform and by_rank_order(geo.layout, r, ql, kl, geo.mask):
        reps = ((0, 1), (0, 0), (1, 0))  # query rank before, at, after the key rank
        return torch.sign(qo - ko) + 1, [pieces(a, b) for a, b in reps]
    keys = _relative_keys(geo, qo, ko) if uniform and geo.mask.docs is None else None
    if keys is not None:
        ids = _row_ids(keys.reshape(r * r, -1))
        first = torch.full((int(ids.max()) + 1,), r * r, dtype=torch.int64).scatter_reduce(
            0, ids, torch.arange(r * r), "amin")  # one block of each class
        return ids.reshape(r, r), [pieces(int(qo.flatten()[f]), int(ko.flatten()[f]))
                                   for f in first.tolist()]
    index: dict[tuple, int] = {}
    found: list[tuple[Piece, ...]] = []
    ids_l = []
    for a, b in zip(qo.flatten().tolist(), ko.flatten().tolist()):
        pcs = pieces(a, b)
        key = tuple(_piece_key(pc) for pc in pcs)  # slices do not hash
        if key not in index:
            index[key] = len(found)
            found.append(pcs)
        ids_l.append(index[key])
    return torch.tensor(ids_l).reshape(r, r), found


_RUNS = 8  # most runs of consecutive positions per rank classified by their offsets


def _relative_keys(geo: Geometry, qo: Tensor, ko: Tensor) -> Tensor | None:
    """A key per block such that blocks with equal keys see the same (query row, key)
    pairs, or None when ranks hold more than `_RUNS` runs. A causal or windowed mask sees
    a pair by its key position minus its query position only, so a block is fixed by its
    ranks' runs (lengths, in local order) and, per pair of runs, the offset between their
    starts, an offset at which the pair sees nothing (before, after) or everything
    standing for all such offsets."""
    runs = _rank_runs(geo.layout, geo.world, geo.q_lens[0], geo.fold)
    most_runs = max(len(x) for x in runs)
    if most_runs > _RUNS:
        return None
    # [rank, run, (start, length)]; ranks with fewer runs padded with empty ones
    t = torch.tensor([x + [(0, 0)] * (most_runs - len(x)) for x in runs], dtype=torch.int64)
    qs, qn = t[qo][..., 0, None], t[qo][..., 1, None]   # [q rank, k rank, run a, 1]
    ks, kn = t[ko][..., None, :, 0], t[ko][..., None, :, 1]  # [..., 1, run b]
    left, right = geo.mask.window
    far = 1 << 40
    lo_ok = -left if left >= 0 else -far   # offsets (key - query) a pair may have
    hi_ok = min(right if right >= 0 else far, 0 if geo.mask.causal else far)
    delta = ks - qs
    least, most = delta - (qn - 1), delta + (kn - 1)  # offsets within this pair of runs
    code = torch.where(least > hi_ok, far + 1, delta)
    code = torch.where(most < lo_ok, far + 2, code)
    code = torch.where((least >= lo_ok) & (most <= hi_ok), far + 3, code)
    code = torch.where((qn == 0) | (kn == 0), far + 4, code)  # a padding run
    return torch.cat([t[qo][..., 1], t[ko][..., 1], code.flatten(2)], -1)


@lru_cache(maxsize=16)
def _rank_runs(layout: str, world: int, local_len: int, fold: int
               ) -> list[list[tuple[int, int]]]:
    """Per rank, (start, length) of each run of consecutive positions it holds."""
    out = []
    for rank in range(world):
        pos = positions(layout, rank, world, local_len, None, fold)
        cut = torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1
        bounds = [0, *cut.tolist(), len(pos)]
        out.append([(int(pos[a]), b - a) for a, b in zip(bounds, bounds[1:])])
    return out


def _row_ids(keys: Tensor) -> Tensor:
    """Dense ids of the distinct rows of an int64 matrix (equal rows, equal ids): each
    column ranked, then the ranks joined column by column (re-ranked to stay small)."""
    ids = torch.zeros(len(keys), dtype=torch.int64)
    for col in keys.t():
        _, rank = torch.unique(col, return_inverse=True)
        _, ids = torch.unique(ids * (int(rank.max()) + 1) + rank, return_inverse=True)
    return ids


def _piece_key(p: Piece) -> tuple:
    b = None if p.b is None else (p.b.start, p.b.stop)
    return p.q.start, p.q.stop, p.k.start, p.k.stop, p.lo, p.hi, b


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
