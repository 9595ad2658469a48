"""When each step of the ring loop runs: the one time model of `plan()` and the simulator.

An option's routing, byte counts and pieces of work come from `ringmem.plan` (its
`Estimate`: `messages`, `work`, `heads`); this module only decides *when* things happen,
per rank per ring step, following the real loop (`ringmem.ring._Loop`):

* all-to-alls (Ulysses) before and after the loop block every rank;
* at the start of step s a rank posts the move of the buffer it holds (needed at s+1),
  computes step s, posts the return of its results (TokenRing's second direction; dK/dV
  in the backward of `kv`), then folds in the return it received for step s-1, then waits
  for the move: step s+1 starts when both its own work and its input are there;
* `allgather` posts every fetch before step 0; step s waits only for its own;
* when there are returns, the own block is split by rows: the first half at step 0, the
  second half after the last step, overlapping the final return;
* a link that does not overlap compute (gloo on the CPU cores) serialises: a transfer
  starts when its sender's compute ends and the sender's next step waits for it; the
  all-gather's fetches are all copied before any compute.

Each group of messages in flight together (the moves of step s with the returns of step
s-1) shares links in `links.Cluster.durations` (contention); different groups do not.

What a block costs is the caller's: `plan()` passes its `KernelModel`, the simulator a
device `Profile` (`sim.kernel`) and the loop's epilogue costs (`Impl`). Each step is a few
tensor operations over all ranks (a 1024-rank ring in a fraction of a second); the
messages of every step's group are timed on their links at once, before the steps run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from .options import moving_side
from .routes import Messages, WorkTable

if TYPE_CHECKING:
    from .links import Cluster


class BlockTimes(Protocol):
    """Seconds of one block launch and of one memory-bound pass (`sim.kernel.Profile`,
    `kernel_model.KernelModel`), and the host's own: `step_s` per ring step on every rank (the
    loop's Python, posting its transfers), `call_s` once per call (argument checks, the
    cross-rank agreement)."""
    step_s: float
    call_s: float

    def block_s(self, rows: int, keys: int, pairs: float, heads: int, batch: int, d: int,
                phase: str, kv_heads: int = 0, itemsize: int = 2) -> float: ...

    def epilogue_s(self, elems: float, per_elem: float) -> float: ...

    def all_to_all(self, ranks: int) -> float: ...  # an all-to-all's cost over its latency


class Routed(Protocol):
    """What the time model reads of an option's routing (`plan.Estimate`)."""
    ring: str  # the ring schedule
    ulysses: int  # the all-to-all group's size (1: none)
    messages: dict[str, list[Any]]  # per phase: `plan.Message`s
    work: list[list[tuple[tuple[int, int, float], ...]]]  # [rank][step]: pieces
    heads: tuple[int, int]  # (query heads, most K/V heads) per rank
    batch: int
    head_dim: int
    # [rank]: the own block's pieces split at its middle row, as the loop splits it when
    # results return (empty: each piece split by its rows, `split_piece`)
    halves: list[tuple[tuple[tuple[int, int, float], ...], tuple[tuple[int, int, float], ...]]]


@dataclass(frozen=True)
class Impl:
    """Bytes per element the ring loop moves to fold one block's result into the fp32
    accumulators: forward merge of (out, lse), backward sum of gradients, and the extra
    copy when a piece covers only part of the rows (a sliced update written back)."""
    name: str
    fwd_merge: float
    bwd_sum: float
    partial_copy: float = 0.0

    @classmethod
    def ringmem(cls, itemsize: int, acc: int) -> Impl:
        """ringmem's loop (`partial.merge_into`, `ring._Acc.add`): forward = upcast the
        block (itemsize + acc) + scale in place (2 acc) + fused multiply-add (3 acc);
        backward = upcast (itemsize + acc) + add in place (3 acc)."""
        return cls("ringmem", itemsize + 6 * acc, itemsize + 4 * acc)

    @classmethod
    def ring_flash_attn(cls) -> Impl:
        """ring-flash-attn's `update_out_and_lse` in bf16/fp32 as its source writes it:
        upcast (2 + 4), out - block_out (12), sigmoid(.) * that (8), out - that (12) = 38;
        a zigzag half-row update writes the slice back (8); backward: dq/dk/dv += the
        block's bf16 gradient into fp32 (4 + 2 + 4 = 10)."""
        return cls("ring-flash-attn", 38.0, 10.0, 8.0)


Piece = tuple[int, int, float]  # (rows, keys, pairs per batch row)


@dataclass
class PhaseResult:
    """Simulated times of one phase; starts/ends [rank, step] of each block's compute
    (`start`/`end`: the same as lists)."""
    time_s: float
    starts: Tensor = field(default_factory=lambda: torch.zeros(0, 0))
    ends: Tensor = field(default_factory=lambda: torch.zeros(0, 0))
    compute_s: float = 0.0  # the busiest rank's compute (kernels + epilogues)
    a2a_s: float = 0.0      # the blocking all-to-alls
    bytes: int = 0          # every message the simulation timed (equals plan()'s count)
    links_s: float = 0.0    # the links busy, group after group, hidden by compute or not

    @property
    def start(self) -> list[list[float]]:
        return self.starts.tolist()

    @property
    def end(self) -> list[list[float]]:
        return self.ends.tolist()


def split_piece(piece: Piece) -> tuple[Piece, Piece]:
    """(first half of the rows, second half) of a piece. An unmasked piece halves; a piece
    the causal diagonal cuts (row i sees a + i keys) gives n^2/8 fewer pairs to the first
    half than to the second."""
    rows, keys, pairs = piece
    a = rows // 2
    if pairs >= rows * keys:
        first = pairs * a / rows
    else:
        first = min(max(0.0, pairs / 2 - rows * rows / 8), pairs)
    return (a, keys, first), (rows - a, keys, pairs - first)


def _pieces_s(prof: BlockTimes, pieces, est: Routed, phase: str, itemsize: int) -> float:
    return sum(prof.block_s(r, k, p, est.heads[0], est.batch, est.head_dim, phase,
                            est.heads[1], itemsize) for r, k, p in pieces)


def _epilogue(prof: BlockTimes, impl: Impl, pieces, est: Routed, phase: str, moving: str,
              q_local: int) -> float:
    """The stationary side's fold of one step's results into its accumulators (for `kv`
    backward the travelling dk/dv are summed by their owner: `_ret_fold`)."""
    hl, hkv = est.heads
    bd = est.batch * est.head_dim
    t = 0.0
    for rows, keys, _ in pieces:
        if moving == "kv":  # Q stays: out merge (fwd) or dq sum (bwd)
            per = impl.fwd_merge if phase == "fwd" else impl.bwd_sum
            if rows < q_local:
                per += impl.partial_copy
            t += prof.epilogue_s(rows * hl * bd, per)
        elif phase == "bwd":  # Q travels: K/V stay, dk + dv summed
            t += prof.epilogue_s(2 * keys * hkv * bd, impl.bwd_sum)
    return t


def _ret_fold(prof: BlockTimes, impl: Impl, nbytes: int, itemsize: int, acc: int,
              phase: str) -> float:
    """Folding a returned partial into the owner's accumulator. It travels in the input
    dtype (out, plus a small fp32 lse) forward and in fp32 (gradients) backward."""
    if phase == "fwd":
        return prof.epilogue_s(nbytes / itemsize, impl.fwd_merge)
    return prof.epilogue_s(nbytes / acc, impl.bwd_sum)


def _tables(est: Routed, phase: str) -> tuple[Messages, WorkTable]:
    """The phase's messages and work as tensors: plan()'s estimate holds them already; a
    hand-made one (lists) is converted."""
    routes = getattr(est, "routes", None)
    have = routes.messages if routes is not None else est.messages
    if phase not in have:
        raise ValueError(f"phase {phase!r} not in this estimate (plan it with "
                         f"backward=True for 'bwd'), has {sorted(have)}")
    if routes is not None:
        return routes.messages[phase], routes.work
    return Messages.of(est.messages[phase]), WorkTable.of(est.work, est.halves)


def _max_at(target: Tensor, index: Tensor, values: Tensor) -> None:
    target.scatter_reduce_(0, index, values, "amax")


def simulate_phase(est: Routed, phase: str, prof: BlockTimes, net: Cluster, *,
                   itemsize: int = 2, acc: int = 4, impl: Impl | None = None) -> PhaseResult:
    """Simulate `phase` ("fwd" or "bwd") of one `plan()` option estimate; impl: the loop's
    epilogue costs (default: ringmem's for this itemsize). Each step is computed for all
    ranks at once (tensors), so a ring of 1024 ranks takes a fraction of a second."""
    impl = impl if impl is not None else Impl.ringmem(itemsize, acc)
    msgs, table = _tables(est, phase)
    world, r = table.ids.shape
    if net.world != world:
        raise ValueError(f"network world {net.world} != the estimate's {world} ranks")
    moving = moving_side(est.ring)
    a2a = msgs.channel("a2a")
    pre, post = msgs.where(a2a & (msgs.step < 0)), msgs.where(a2a & (msgs.step >= 0))
    fetches = msgs.where(msgs.channel("fetch"))
    ret_m = msgs.channel("ret") & (msgs.step >= 0) & (msgs.step < r)
    move_m = msgs.channel("move") & (msgs.step >= 0) & (msgs.step < r)
    returns = bool(ret_m.any())
    # per class of block: its kernels (+ the host's step) and its fold into the accumulators
    step0_cls = table.ids[:, 0].unique().tolist()
    q_local = max((pc[0] for c in step0_cls for pc in table.classes[c]), default=0)
    kern = [_pieces_s(prof, pcs, est, phase, itemsize) + prof.step_s for pcs in table.classes]
    fold = [k + _epilogue(prof, impl, pcs, est, phase, moving, q_local)
            for k, pcs in zip(kern, table.classes)]
    comp = torch.tensor(fold, dtype=torch.float64)[table.ids]
    comp[:, 0] = torch.tensor(kern, dtype=torch.float64)[table.ids[:, 0]]
    last = torch.zeros(world, dtype=torch.float64)
    if returns:  # the own block: half now, half while the final return travels
        halves = table.halves or tuple(
            tuple(tuple(h[i] for h in (split_piece(pc) for pc in table.classes[c]))
                  for i in (0, 1)) for c in table.ids[:, 0].tolist())
        comp[:, 0] = torch.tensor([_pieces_s(prof, h[0], est, phase, itemsize) + prof.step_s
                                   for h in halves], dtype=torch.float64)
        last = torch.tensor([_pieces_s(prof, h[1], est, phase, itemsize) for h in halves],
                            dtype=torch.float64)
    # a measured all-to-all costs more than its messages' latency (`KernelModel.a2a_s`)
    a2a_fixed = prof.all_to_all(est.ulysses)
    pre_s = net.time_of(pre.src, pre.dst, pre.nbytes) + (a2a_fixed if len(pre) else 0.0)
    post_s = net.time_of(post.src, post.dst, post.nbytes) + (a2a_fixed if len(post) else 0.0)
    t0 = prof.call_s + pre_s
    arrive = torch.full((r + 1, world), t0, dtype=torch.float64)  # [step, rank]: inputs
    links = 0.0
    if len(fetches):  # posted together before step 0; step s's data behind the earlier's
        d = net.queued_durations(fetches.src, fetches.dst, fetches.nbytes, fetches.step)
        arrive.view(-1).scatter_reduce_(0, fetches.step * world + fetches.dst, t0 + d, "amax")
        links = net.time_of(fetches.src, fetches.dst, fetches.nbytes)
    start = torch.zeros(r, world, dtype=torch.float64)
    end = torch.zeros(r, world, dtype=torch.float64)
    ready = torch.full((world,), t0, dtype=torch.float64)  # when each rank may start
    if len(fetches) and not net.overlap:  # the cores copy every fetch before they compute
        ready += links
    ret_at = torch.zeros(r, world, dtype=torch.float64)  # [step, rank]: its returns' arrival
    ret_cost = torch.zeros(r, world, dtype=torch.float64)
    has_ret = torch.zeros(r, world, dtype=torch.bool)
    moves, rets = (_by_step(msgs.where(m)) for m in (move_m, ret_m))
    mv_at, rt_at = _starts(moves.step, r), _starts(rets.step, r)
    rets_fold = _ret_fold_t(prof, impl, rets.nbytes, itemsize, acc, phase)
    # the messages in flight together, sharing links: step s's moves with the returns of
    # step s-1 (group s; the last step's returns alone, group r). Times never change
    # which messages share, so every group's durations are computed at once.
    group = torch.cat([moves.step, rets.step + 1])
    durs = net.durations_of(torch.cat([moves.src, rets.src]), torch.cat([moves.dst, rets.dst]),
                            torch.cat([moves.nbytes, rets.nbytes]), group=group)
    d_mv, d_rt = durs[:len(moves)], durs[len(moves):]
    longest = torch.zeros(r + 1, dtype=torch.float64).scatter_reduce(0, group, durs, "amax")
    present = torch.zeros(r + 1, dtype=torch.bool)
    present[group] = True
    for x in longest[present].tolist():  # group by group, in step order
        links += x
    comp_t = comp.t().contiguous()
    zero = torch.zeros(world, dtype=torch.float64)
    for s in range(r):
        start[s] = torch.maximum(ready, arrive[s])
        end[s] = start[s] + comp_t[s]
        mv, rt = slice(mv_at[s], mv_at[s + 1]), slice(rt_at[s - 1] if s else 0, rt_at[s])
        m_src, m_dst, r_src, r_dst = moves.src[mv], moves.dst[mv], rets.src[rt], rets.dst[rt]
        posted_mv = start[s][m_src]
        posted_rt = end[s - 1][r_src] if s else zero[:0]
        send_busy = zero  # without overlap: when each sender's copies end
        if not net.overlap:  # the cores that compute also copy: after the compute
            posted_mv = torch.maximum(posted_mv, end[s][m_src])
            send_busy = zero.clone()
            _max_at(send_busy, torch.cat([m_src, r_src]),
                    torch.cat([posted_mv + d_mv[mv], posted_rt + d_rt[rt]]))
        _max_at(arrive[s + 1], m_dst, posted_mv + d_mv[mv])
        if len(r_src):
            _max_at(ret_at[s - 1], r_dst, posted_rt + d_rt[rt])
            ret_cost[s - 1].index_add_(0, r_dst, rets_fold[rt])
            has_ret[s - 1, r_dst] = True
        ready = torch.maximum(end[s], send_busy)
        if s >= 2:
            ready = torch.where(has_ret[s - 1], torch.maximum(ready, ret_at[s - 1])
                                + ret_cost[s - 1], ready)
    # the last step's returns: posted after its compute, in flight beside the second half
    rt = slice(rt_at[r - 1], rt_at[r])
    if r > 1 and rt.stop > rt.start:
        r_dst = rets.dst[rt]
        _max_at(ret_at[r - 1], r_dst, end[r - 1][rets.src[rt]] + d_rt[rt])
        ret_cost[r - 1].index_add_(0, r_dst, rets_fold[rt])
        has_ret[r - 1, r_dst] = True
    done = ready + last
    if r > 1:
        done = torch.where(has_ret[r - 1], torch.maximum(done, ret_at[r - 1])
                           + ret_cost[r - 1], done)
    total = float(done.max()) + post_s
    busy = float((comp.sum(1) + last).max())
    timed = int(msgs.nbytes[a2a | msgs.channel("fetch") | move_m | ret_m].sum())
    a2a_s = pre_s + post_s  # the per-call host cost is neither link nor all-to-all
    return PhaseResult(total, start.t(), end.t(), busy, a2a_s, timed,
                       links + a2a_s)


def _starts(step: Tensor, r: int) -> list[int]:
    """Where each step's messages begin in a list sorted by step (r + 1 bounds)."""
    return torch.searchsorted(step, torch.arange(r + 1)).tolist()


def _by_step(m: Messages) -> Messages:
    return m.where(torch.sort(m.step, stable=True).indices)


def _ret_fold_t(prof: BlockTimes, impl: Impl, nbytes: Tensor, itemsize: int, acc: int,
                phase: str) -> Tensor:
    """`_ret_fold` of every message at once (a memory-bound pass is linear in its bytes)."""
    return torch.as_tensor(_ret_fold(prof, impl, nbytes.double(),  # type: ignore[arg-type]
                                     itemsize, acc, phase), dtype=torch.float64)
