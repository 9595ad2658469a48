"""The ring loop: forward and backward of exact attention over a sequence-parallel group.

One loop, parametrised by layout (block pieces from global positions), schedule (which
side travels, see `routing`) and backend (computes one block). Per step: post the transfer
of the next moving buffer, compute the current block, post the return of its moving-side
results to their owner, then wait only for the buffers about to be used. The own block is
computed half first and half last, so the final return is overlapped with work too.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .backends import Backend
from .backends.base import propagate_nonfinite
from .comm import RingComm
from .masking import Mask
from .options import fetches, moving_side
from .partial import Partial, acc_dtype, merge_into
from .routing import Geometry, held, split_rows, step_block, used

Side = list[tuple[Tensor, int]]  # tensors of one side with their sequence dims
Template = list[tuple[tuple[int, ...], int, torch.dtype]]  # shape, seq dim, wire dtype


@dataclass(frozen=True)
class RingSpec:
    """Everything the loop needs besides tensors; identical on every rank (checked upstream)."""
    layout: str
    mask: Mask
    scale: float
    backend: Backend
    schedule: str  # "kv", "q" or "allgather" (resolved)
    softcap: float = 0.0  # 0: none
    hop: int = 1  # ring direction (see `routing`)
    fold: int = 1  # layout shards per rank (after a Ulysses all-to-all)

    def __post_init__(self) -> None:
        if isinstance(self.mask, bool):  # a plain causal flag
            object.__setattr__(self, "mask", Mask(causal=self.mask))

    @property
    def causal(self) -> bool:
        return self.mask.causal

    def geometry(self, world: int, q_local: int, kv_local: int,
                 kv_lens: tuple[int, ...] | None = None) -> Geometry:
        """Equal local lengths on every rank, unless per-rank `kv_lens` are given."""
        return Geometry(self.layout, world, (q_local,) * world,
                        kv_lens if kv_lens is not None else (kv_local,) * world,
                        self.mask, moving_side(self.schedule), self.hop,
                        self.fold, fetches(self.schedule))


def _resized(shape: tuple[int, ...], dim: int, n: int) -> list[int]:
    """`shape` with its sequence dim `dim` set to n."""
    out = list(shape)
    out[dim] = n
    return out


class _Acc:
    """Results over `n` rows/keys: 'sum' adds (gradients), 'lse' merges (out, lse)."""

    def __init__(self, kind: str, template: Template, n: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.kind, self.template, self.n = kind, template, n
        self.dtype, self.device = dtype, device
        self.tensors: list[Tensor] | None = None

    def _alloc(self) -> list[Tensor]:
        ts = []
        for i, (shape, d, _) in enumerate(self.template):
            fill = float("-inf") if self.kind == "lse" and i == 1 else 0.0
            ts.append(torch.full(_resized(shape, d, self.n), fill, dtype=self.dtype,
                                 device=self.device))
        return ts

    def add(self, start: int, parts: list[Tensor], rows: slice | None = None) -> None:
        """Add results for rows/keys [start, ...) (and batch rows `rows`, None: all)."""
        d0 = self.template[0][1]
        if (self.tensors is None and start == 0 and parts[0].shape[d0] == self.n
                and rows is None):
            # the first result over every row is the accumulator (saves a zero fill + merge)
            self.tensors = [p.to(self.dtype).contiguous() for p in parts]
            return
        if self.tensors is None:
            self.tensors = self._alloc()
        views = [t.narrow(d, start, p.shape[d])
                 for t, (_, d, _), p in zip(self.tensors, self.template, parts)]
        if rows is not None:  # batch is dim 0 of every result
            views = [v[rows] for v in views]
        if self.kind == "lse":
            # out [B, S, H, D], lse [B, H, S]: the lse's transpose lines up with out
            merge_into(Partial(views[0], views[1].transpose(1, 2)),
                       Partial(parts[0], parts[1].transpose(1, 2)))
        else:
            for v, p in zip(views, parts):
                v.add_(p)

    def result(self) -> list[Tensor]:
        return self.tensors if self.tensors is not None else self._alloc()

    def wire(self) -> list[Tensor]:
        """Tensors to send: outputs in their wire dtype, gradients as accumulated."""
        return [t.to(w).contiguous() for t, (_, _, w) in zip(self.result(), self.template)]

    def empty_wire(self, n: int) -> list[Tensor]:
        return [torch.empty(_resized(shape, d, n), dtype=w, device=self.device)
                for shape, d, w in self.template]


class _Loop:
    """One ring loop's state, in one place: what the moving side holds now (`held_ts`,
    from row/key `held_lo`), the accumulators, and the return in flight (`pending`).
    `run` goes over the steps; only it and `finish` change these fields."""

    def __init__(self, comm: RingComm, geo: Geometry, sides: dict[str, Side],
                 block: Callable[[list[Tensor], list[Tensor], bool],
                                 dict[str, list[Tensor] | None]],
                 kinds: dict[str, str | None], templates: dict[str, Template],
                 dtype: torch.dtype) -> None:
        self.comm, self.geo, self.sides, self.block = comm, geo, sides, block
        self.kinds, self.templates, self.dtype = kinds, templates, dtype
        self.mv, rank = geo.moving, comm.rank
        lengths = {"q": geo.q_lens[rank], "kv": geo.kv_lens[rank]}
        self.device = sides["q"][0][0].device
        self.accs = {s: _Acc(kinds[s], templates[s], lengths[s], dtype, self.device)
                     for s in kinds if kinds[s]}
        self.returns = kinds[self.mv] is not None and comm.world > 1
        self.held_ts, self.held_lo = self._own(), 0
        # the last return: (works, receive buffers, received span, sent buffers kept alive)
        self.pending = None

    def _own(self) -> list[Tensor]:
        return [t for t, _ in self.sides[self.mv]]

    def post(self, step: int, out_ts: list[Tensor], out_lo: int, send_span, recv_span,
             to: int, frm: int):
        """Post the send of `send_span` of `out_ts` (starting at row/key `out_lo`) and the
        receive of `recv_span`; returns (works, receive buffers)."""
        dims = self.sides[self.mv]
        send = [] if send_span is None else [
            t.narrow(d, send_span[0] - out_lo, send_span[1] - send_span[0]).contiguous()
            for t, (_, d) in zip(out_ts, dims)]
        bufs = [] if recv_span is None else [
            torch.empty(_resized(t.shape, d, recv_span[1] - recv_span[0]), dtype=t.dtype,
                        device=t.device) for t, d in dims]
        if self.geo.fetch:
            return self.comm.fetch(step, send, to, bufs, frm), bufs
        return self.comm.move(step, send, bufs, self.geo.hop), bufs

    def compute(self, pieces, in_off: int, target: dict[str, _Acc], out_off: int = 0) -> None:
        """Run `pieces`; the moving side's inputs start at row/key `in_off` of the held
        buffer, its results land at `out_off` of target[mv]."""
        mv, sides = self.mv, self.sides
        for p in pieces:
            spans = {"q": p.q, "kv": p.k}
            ins = {}
            for side, sl in spans.items():
                ts = self.held_ts if side == mv else [t for t, _ in sides[side]]
                off = in_off if side == mv else 0
                ins[side] = [t.narrow(d, sl.start - off, sl.stop - sl.start)
                             for t, (_, d) in zip(ts, sides[side])]
                if p.b is not None:  # a batch row with its own packing
                    ins[side] = [t[p.b] for t in ins[side]]
            res = self.block(ins["q"], ins["kv"], p.band)
            for side, sl in spans.items():
                if res.get(side) is not None:
                    target[side].add(sl.start - (out_off if side == mv else 0), res[side],
                                     p.b)

    def finish(self) -> None:
        """Wait for the return in flight and add what it brought."""
        if self.pending is not None:
            works, bufs, span = self.pending[:3]
            self.comm.wait(works)
            if span is not None:
                self.accs[self.mv].add(span[0], bufs)
            self.pending = None

    def run(self) -> dict[str, list[Tensor]]:
        comm, geo = self.comm, self.geo
        rank, world = comm.rank, comm.world
        if self.returns:
            comm.prepare_returns()  # before any traffic: it may create a group
        # all-gather: every fetch is posted before any compute (an all-to-all of exactly
        # the spans each rank uses); each step waits only for its own
        fetched = {}
        for s in range(1, world) if geo.fetch else ():
            span = held(geo, geo.owner(rank, s), s)  # what this rank uses of that owner
            fetched[s] = (*self.post(s, self.held_ts, 0, held(geo, rank, s), span,
                                     -geo.hop * s, geo.hop * s), span)
        own_first, own_last = step_block(geo, rank, 0)[2], ()
        if self.returns:
            own_first, own_last = split_rows(own_first, geo.q_lens[rank] // 2)
        for step in range(world):
            move_works, recv_bufs, recv_span = None, [], None
            if step in fetched:
                works, bufs, span = fetched.pop(step)
                comm.wait(works)
                self.held_ts, self.held_lo = bufs, (span[0] if span else 0)
            elif step + 1 < world and not geo.fetch:
                recv_span = held(geo, geo.owner(rank, step + 1), step + 1)
                move_works, recv_bufs = self.post(step, self.held_ts, self.held_lo,
                                                  held(geo, geo.owner(rank, step), step + 1),
                                                  recv_span, -geo.hop, geo.hop)
            if step == 0:
                self.compute(own_first, 0, self.accs)
            else:
                self._visit(step)
            if move_works is not None:
                comm.wait(move_works)
                self.held_ts, self.held_lo = recv_bufs, (recv_span[0] if recv_span else 0)
        if self.returns:
            self.held_ts = self._own()
            self.compute(own_last, 0, self.accs)  # overlaps the last return
            self.finish()
        return {s: a.result() for s, a in self.accs.items()}

    def _visit(self, step: int) -> None:
        """Compute against the block held at `step`; a partial that belongs to the moving
        side's owner goes straight back to it, the previous return is then collected."""
        comm, geo, mv, rank = self.comm, self.geo, self.mv, self.comm.rank
        span = used(geo, rank, step)
        target = dict(self.accs)
        if self.kinds[mv] is not None and span is not None:  # a partial for the owner
            target[mv] = _Acc(self.kinds[mv], self.templates[mv], span[1] - span[0],
                              self.dtype, self.device)
        self.compute(step_block(geo, rank, step)[2], self.held_lo, target,
                     span[0] if span else 0)
        if self.returns:
            in_span = used(geo, geo.holder(rank, step), step)
            out = target[mv].wire() if span is not None else []
            bufs = [] if in_span is None else self.accs[mv].empty_wire(in_span[1] - in_span[0])
            works = comm.ret(step, out, geo.hop * step, bufs, -geo.hop * step)
            self.finish()
            self.pending = (works, bufs, in_span, out)


def _ring(comm: RingComm, geo: Geometry, sides: dict[str, Side],
          block: Callable[[list[Tensor], list[Tensor], bool], dict[str, list[Tensor] | None]],
          kinds: dict[str, str | None], templates: dict[str, Template],
          dtype: torch.dtype) -> dict[str, list[Tensor]]:
    """The one ring loop. sides/kinds/templates are keyed by "q" and "kv"."""
    return _Loop(comm, geo, sides, block, kinds, templates, dtype).run()


def _extra(spec: RingSpec) -> dict:
    """Backend keywords beyond the protocol's core (only when used: every backend takes
    the core call)."""
    return {"softcap": spec.softcap} if spec.softcap else {}


def ring_forward(q: Tensor, k: Tensor, v: Tensor, spec: RingSpec, comm: RingComm,
                 kv_lens: tuple[int, ...] | None = None) -> tuple[Tensor, Tensor]:
    """q [B, S, Hq, D], k/v [B, S, Hkv, D] (local shards) -> out (q.dtype), lse [B, Hq, S].

    kv_lens: every rank's local key length when they differ (non-causal only)."""
    b, s, hq, d = q.shape
    acc = acc_dtype(q.dtype)

    def block(qs, kvs, band):
        out, lse = spec.backend.fwd(qs[0], kvs[0], kvs[1], spec.scale, band, **_extra(spec))
        # the non-finite rule here, once for every backend (fused ops mask inf keys away)
        return {"q": list(propagate_nonfinite(qs[0], out, lse, kvs[0], kvs[1], band))}

    res = _ring(comm, spec.geometry(comm.world, s, k.shape[1], kv_lens),
                {"q": [(q, 1)], "kv": [(k, 1), (v, 1)]},
                block, {"q": "lse", "kv": None},
                {"q": [((b, s, hq, d), 1, q.dtype), ((b, hq, s), 2, acc)]}, acc)
    out, lse = res["q"]
    return out.to(q.dtype), lse


def ring_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  spec: RingSpec, comm: RingComm) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of the local shards, given the global out/lse of the local queries.
    Accumulated in fp32 (fp64 for fp64), returned in the input dtype."""
    b, s, hq, d = q.shape
    acc = acc_dtype(q.dtype)

    def block(qs, kvs, band):
        dq, dk, dv = spec.backend.bwd(qs[1], qs[0], kvs[0], kvs[1], qs[2], qs[3], spec.scale,
                                      band, **_extra(spec))
        return {"q": [dq], "kv": [dk, dv]}

    kv_t = [(tuple(k.shape), 1, acc)] * 2
    res = _ring(comm, spec.geometry(comm.world, s, k.shape[1]),
                {"q": [(q, 1), (dout, 1), (out, 1), (lse, 2)], "kv": [(k, 1), (v, 1)]},
                block, {"q": "sum", "kv": "sum"},
                {"q": [((b, s, hq, d), 1, acc)], "kv": kv_t}, acc)
    (dq,), (dk, dv) = res["q"], res["kv"]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
