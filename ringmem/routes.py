"""Every option's routing as tensors: the bytes each rank sends at each step, every message,
and the work of each block, for rings of any size (`plan()` at 1024 ranks).

The same rules as the loop's (`routing`: `step_block`, `used`, `held`), evaluated for all
ranks and steps at once instead of block by block. Blocks come in classes: under a plain
mask of a rank-ordered layout a block depends only on whether its query rank is before,
at or after its key rank (`masking.by_rank_order`), so a ring of any size has three;
other masks (windows, documents) are classified block by block. A class gives the
pieces of work and the span of the moving side they use; `held` (what an owner's buffer
still carries at step t: the union of what its later holders use) is a reversed running
min/max over the steps. `tests/test_masks.py` and `tests/test_parallel.py` check these
bytes against what real calls send (`CommStats`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import Tensor

from .kernel_model import cpu_causal_scores
from .masking import Piece, pairs
from .routing import Geometry, block_classes, span_of, split_rows

CHANNELS = ("move", "fetch", "ret", "a2a")
_NONE = 1 << 60  # the low end of an empty span (its high end: -_NONE)

Work = tuple[tuple[int, int, float], ...]  # one block's pieces: (rows, keys, pairs per batch row)


@dataclass(frozen=True)
class Messages:
    """Transfers as columns (`plan.Message` fields; channel: an index into CHANNELS)."""
    step: Tensor
    chan: Tensor
    src: Tensor
    dst: Tensor
    nbytes: Tensor

    @classmethod
    def of(cls, msgs: Iterable[Any]) -> Messages:
        """From (step, channel name, src, dst, nbytes) tuples (`plan.Message`)."""
        rows = [(m[0], CHANNELS.index(m[1]), m[2], m[3], m[4]) for m in msgs]
        t = torch.tensor(rows, dtype=torch.int64).reshape(-1, 5)
        return cls(*t.unbind(1))

    @classmethod
    def cat(cls, parts: list[Messages]) -> Messages:
        return cls(*(torch.cat([getattr(p, f) for p in parts]) for f in
                     ("step", "chan", "src", "dst", "nbytes")))

    def where(self, keep: Tensor) -> Messages:
        return Messages(self.step[keep], self.chan[keep], self.src[keep], self.dst[keep],
                        self.nbytes[keep])

    def __len__(self) -> int:
        return len(self.step)

    def channel(self, name: str) -> Tensor:
        return self.chan == CHANNELS.index(name)

    def tuples(self) -> list[tuple[int, str, int, int, int]]:
        cols = [c.tolist() for c in (self.step, self.chan, self.src, self.dst, self.nbytes)]
        return [(s, CHANNELS[c], a, z, b) for s, c, a, z, b in zip(*cols)]


@dataclass(frozen=True)
class WorkTable:
    """Per rank and step, the class of the block it computes (`ids` [world, steps]) and
    each class's pieces; halves[rank]: its own block split at its middle row, as the loop
    splits it when results return (empty: each piece split by its rows)."""
    ids: Tensor
    classes: tuple[Work, ...]
    halves: tuple[tuple[Work, Work], ...] = ()

    @classmethod
    def of(cls, work: list[list[Work]], halves: Any = ()) -> WorkTable:
        index: dict[Work, int] = {}
        ids = [[index.setdefault(tuple(w), len(index)) for w in row] for row in work]
        return cls(torch.tensor(ids, dtype=torch.int64).reshape(len(work), -1),
                   tuple(index), tuple(tuple(h) for h in halves))

    def lists(self) -> list[list[Work]]:
        return [[self.classes[c] for c in row] for row in self.ids.tolist()]


@dataclass(frozen=True)
class Routes:
    """One option's routing. steps[phase] [world, ring steps, 2]: (bytes sent, received)
    in the loop; a2a[phase] [world, 2] the same for the all-to-alls; messages[phase] every
    transfer (the all-to-all before the loop first, then by step, rank, kind); pairs
    [world, steps] (query, key) pairs over the batch; buffers: received inputs alive at
    once on the busiest rank, any phase."""
    steps: dict[str, Tensor]
    a2a: dict[str, Tensor]
    messages: dict[str, Messages]
    work: WorkTable
    pairs: Tensor
    buffers: int


def cost_pairs(p: Piece, dense: bool, tiles: bool = False) -> int:
    """The scores a backend computes for a piece: its pairs, or every rows x keys where a
    band (not the plain causal triangle) runs as a dense bias (`KernelModel.dense_bands`),
    or a causal piece's whole tiles of the CPU op (`KernelModel.cpu_tiles`)."""
    n, m = p.q.stop - p.q.start, p.k.stop - p.k.start
    if dense and p.band != (None, None) and not p.causal:
        return n * m
    if tiles and p.causal:
        return cpu_causal_scores(n, m)
    return pairs(p)


def _share(p: Piece, batch: int) -> float:
    return (p.b.stop - p.b.start) / batch if p.b is not None else 1


def _work(pieces: tuple[Piece, ...], dense: bool, batch: int, tiles: bool) -> Work:
    """A block's pieces as (rows, keys, scores computed per batch row)."""
    return tuple((p.q.stop - p.q.start, p.k.stop - p.k.start,
                  cost_pairs(p, dense, tiles) * _share(p, batch)) for p in pieces)


def route(geo: Geometry, u: int, phases: tuple[str, ...], rows: dict, a2a_sizes: dict,
          kvn: list[int], batch: int, dense: bool, tiles: bool = False) -> Routes:
    """Route one option: `geo` the ring of world/u ranks, u the Ulysses degree; rows
    [phase]: (bytes per moving row or key for each Ulysses index i, bytes per returned
    row for each i); a2a_sizes[phase]: `a2a_sizes`; kvn: K/V heads per i; dense, tiles:
    how pieces are costed (`cost_pairs`)."""
    r, hop, moving = geo.world, geo.hop, geo.moving
    ids, classes = block_classes(geo)
    spans = [span_of(pcs, moving) or (_NONE, -_NONE) for pcs in classes]
    lo = torch.tensor([s[0] for s in spans])[ids]  # [rank j, step s]: span j uses at s
    hi = torch.tensor([s[1] for s in spans])[ids]
    use = (hi - lo).clamp(min=0)
    ar = torch.arange(r)
    holder = (ar.unsqueeze(1) - hop * ar) % r  # [owner, step]
    owner = (ar.unsqueeze(1) + hop * ar) % r   # [rank, step]
    steps = ar.expand(r, r)
    if geo.fetch:  # what the holder at t uses, fetched straight from the owner
        out_len = use[holder, steps]            # [j, s]: j's rows fetched at s
        recv_len, to = use, holder
        slot = steps >= 1
    else:  # a move carries what the holders at t and after use: a reversed running union
        g_lo, g_hi = lo[holder, steps], hi[holder, steps]
        later_lo = g_lo.flip(1).cummin(1).values.flip(1)
        later_hi = g_hi.flip(1).cummax(1).values.flip(1)
        held = torch.zeros(r, r + 1, dtype=torch.int64)  # [owner, t], t >= 1
        held[:, 1:r] = (later_hi - later_lo).clamp(min=0)[:, 1:]
        nxt = (steps + 1).clamp(max=r)
        out_len = held[owner, nxt]
        recv_len = held[(ar.unsqueeze(1) + hop * nxt) % r, nxt]
        to = ((ar - hop) % r).unsqueeze(1).expand(r, r)
        slot = steps <= r - 2
    world, shape = r * u, (r, r, u)
    # [s, j, i] of every message: slot 0 the move or fetch, slot 1 the return
    t = lambda x: x.t().unsqueeze(2)  # noqa: E731  [j, s] -> [s, j, 1]
    move_ok, ret_ok = t(slot), t(steps) >= 1
    ret_out, ret_recv = t(use), t(use[holder, steps])
    out_len, recv_len = t(out_len), t(recv_len)
    p = ar.unsqueeze(1) * u + torch.arange(u)  # [j, i]
    step_c = ar.view(r, 1, 1, 1).expand(*shape, 2)
    chan = torch.tensor([CHANNELS.index("fetch" if geo.fetch else "move"),
                         CHANNELS.index("ret")]).expand(*shape, 2)
    src = p.unsqueeze(0).unsqueeze(3).expand(*shape, 2)
    dst = torch.stack([(t(to) * u + torch.arange(u)).expand(shape),
                       (t(owner) * u + torch.arange(u)).expand(shape)], 3)
    steps_b, a2a, messages = {}, {}, {}
    buffers = 0
    for phase in phases:
        row, rrow = (torch.tensor(x, dtype=torch.int64) for x in rows[phase])
        sent = torch.where(move_ok, out_len * row, 0) + torch.where(ret_ok, ret_out * rrow, 0)
        recv = torch.where(move_ok, recv_len * row, 0) + torch.where(ret_ok, ret_recv * rrow,
                                                                     0)
        per = torch.stack([x.permute(1, 2, 0).reshape(world, r) for x in (sent, recv)], 2)
        valid = torch.stack([move_ok.expand(shape), ret_ok.expand(shape) & (rrow != 0)], 3)
        nb = torch.stack([(out_len * row).expand(shape), (ret_out * rrow).expand(shape)], 3)
        keep = valid.flatten()
        loop = Messages(*(x.flatten()[keep] for x in (step_c, chan, src, dst, nb)))
        pre, post = _a2a(u, r, a2a_sizes[phase], kvn)
        messages[phase] = Messages.cat([pre, loop, post])
        totals = torch.zeros(world, 2, dtype=torch.int64)
        for m in (pre, post):
            totals[:, 0].index_add_(0, m.src, m.nbytes)
            totals[:, 1].index_add_(0, m.dst, m.nbytes)
        steps_b[phase], a2a[phase] = per, totals
        buffers = max(buffers, _buffers(loop, pre, world, r))
    rank_ids = ids.repeat_interleave(u, 0)  # [world, step]: rank j*u+i computes j's block
    split = {c: tuple(_work(half, dense, batch, tiles)
                      for half in split_rows(classes[c], geo.q_lens[0] // 2))
             for c in set(ids[:, 0].tolist())}
    halves = tuple(split[c] for c in rank_ids[:, 0].tolist())
    pair_cls = torch.tensor([round(sum(pairs(pc) * _share(pc, batch) for pc in pcs) * batch)
                             for pcs in classes], dtype=torch.int64)
    work = WorkTable(rank_ids, tuple(_work(pcs, dense, batch, tiles) for pcs in classes),
                     halves)
    return Routes(steps_b, a2a, messages, work, pair_cls[rank_ids], buffers)


def a2a_sizes(phase: str, b: int, sq: int, skv: int, hl: int, d: int, itemsize: int,
              acc: int, return_lse: bool) -> dict:
    """Bytes per rank pair of the all-to-alls: the query side's tensors (q in, out back;
    backward: dout in, dq back) and K/V per head (k, v in; backward: dk, dv back)."""
    q = b * sq * hl * d * itemsize
    if phase == "fwd":
        lse = b * hl * sq * acc if return_lse else 0
        return {"q_in": q, "q_out": q + lse, "kv_in": 2 * b * skv * d * itemsize,
                "kv_out": 0}
    return {"q_in": q, "q_out": q, "kv_in": 0, "kv_out": 2 * b * skv * d * itemsize}


def _a2a(u: int, r: int, sizes: dict, kvn: list[int]) -> tuple[Messages, Messages]:
    """The all-to-alls before (step -1) and after (step r) the loop, inside each group
    of u ranks: i sends i2 its share and the K/V heads i2 computes; i2's results for
    i's rows go back to i."""
    j, i, i2 = (x.flatten() for x in torch.meshgrid(torch.arange(r), torch.arange(u),
                                                     torch.arange(u), indexing="ij"))
    keep = i != i2
    j, i, i2 = j[keep], i[keep], i2[keep]
    heads = torch.tensor(kvn, dtype=torch.int64)[i2]
    a, z = j * u + i, j * u + i2
    full = lambda v: torch.full_like(a, v)  # noqa: E731
    ch = CHANNELS.index("a2a")
    return (Messages(full(-1), full(ch), a, z, sizes["q_in"] + sizes["kv_in"] * heads),
            Messages(full(r), full(ch), z, a, sizes["q_out"] + sizes["kv_out"] * heads))


def _buffers(loop: Messages, pre: Messages, world: int, r: int) -> int:
    """Received inputs alive at once on the busiest rank: every fetch (all-gather) or two
    consecutive moves (the one in use and the next), plus the all-to-all's head split."""
    got = torch.zeros(world * (r + 1), dtype=torch.int64)
    mv = loop.channel("move")
    got.index_add_(0, loop.dst[mv] * (r + 1) + loop.step[mv], loop.nbytes[mv])
    got = got.view(world, r + 1)
    held = torch.zeros(world, dtype=torch.int64)
    fe = loop.channel("fetch")
    held.index_add_(0, loop.dst[fe], loop.nbytes[fe])
    held.index_add_(0, pre.dst, pre.nbytes)
    return int((held + (got[:, :-1] + got[:, 1:]).max(1).values).max())
