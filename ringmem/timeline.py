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
device `Profile` (`sim.kernel`) and the loop's epilogue costs (`Impl`). Pure Python.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .options import moving_side

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


class Routed(Protocol):
    """What the time model reads of an option's routing (`plan.Estimate`)."""
    ring: str  # the ring schedule
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
    """Simulated times of one phase; start/end[rank][step] of each block's compute."""
    time_s: float
    start: list[list[float]] = field(default_factory=list)
    end: list[list[float]] = field(default_factory=list)
    compute_s: float = 0.0  # the busiest rank's compute (kernels + epilogues)
    a2a_s: float = 0.0      # the blocking all-to-alls
    bytes: int = 0          # every message the simulation timed (equals plan()'s count)
    links_s: float = 0.0    # the links busy, group after group, hidden by compute or not


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


def simulate_phase(est: Routed, phase: str, prof: BlockTimes, net: Cluster, *,
                   itemsize: int = 2, acc: int = 4, impl: Impl | None = None) -> PhaseResult:
    """Simulate `phase` ("fwd" or "bwd") of one `plan()` option estimate; impl: the loop's
    epilogue costs (default: ringmem's for this itemsize)."""
    impl = impl if impl is not None else Impl.ringmem(itemsize, acc)
    if phase not in est.messages:
        raise ValueError(f"phase {phase!r} not in this estimate (plan it with "
                         f"backward=True for 'bwd'), has {sorted(est.messages)}")
    world, r = len(est.work), len(est.work[0])
    if net.world != world:
        raise ValueError(f"network world {net.world} != the estimate's {world} ranks")
    moving = moving_side(est.ring)
    msgs = est.messages[phase]
    pre = [(m.src, m.dst, m.nbytes) for m in msgs if m.channel == "a2a" and m.step < 0]
    post = [(m.src, m.dst, m.nbytes) for m in msgs if m.channel == "a2a" and m.step >= 0]
    moves: dict[int, list] = {s: [] for s in range(r)}
    rets: dict[int, list] = {s: [] for s in range(r)}
    for m in msgs:
        if m.channel in ("move", "ret") and 0 <= m.step < r:
            (moves if m.channel == "move" else rets)[m.step].append(m)
    fetches = [m for m in msgs if m.channel == "fetch"]
    returns = any(rets.values())
    q_local = max((pc[0] for p in range(world) for pc in est.work[p][0]), default=0)
    comp = [[_pieces_s(prof, est.work[p][s], est, phase, itemsize) + prof.step_s
             + (_epilogue(prof, impl, est.work[p][s], est, phase, moving, q_local)
                if s else 0.0)
             for s in range(r)] for p in range(world)]
    last = [0.0] * world
    if returns:  # the own block: half now, half while the final return travels
        for p in range(world):
            if est.halves:
                first, second = est.halves[p]
            else:
                split = [split_piece(pc) for pc in est.work[p][0]]
                first, second = tuple(h[0] for h in split), tuple(h[1] for h in split)
            comp[p][0] = _pieces_s(prof, first, est, phase, itemsize) + prof.step_s
            last[p] = _pieces_s(prof, second, est, phase, itemsize)
    pre_s = net.time(pre)
    t0 = prof.call_s + pre_s
    arrive = [[t0] * (r + 1) for _ in range(world)]  # inputs of step s on rank p
    load: dict = {}  # the links' load of every fetch up to step s (added step by step)
    if fetches:  # posted together before step 0; step s's data behind the earlier steps'
        by_step: dict[int, list] = {}
        for m in fetches:
            by_step.setdefault(m.step, []).append((m.src, m.dst, m.nbytes))
        for s in sorted(by_step):
            group = by_step[s]
            for (_, dst, _), d in zip(group, net.arrivals(group, net.load(group, load))):
                arrive[dst][s] = max(arrive[dst][s], t0 + d)
    links = net.time_of(load)  # every fetch on its links (none: 0)
    start = [[0.0] * r for _ in range(world)]
    end = [[0.0] * r for _ in range(world)]
    ready = [t0] * world  # when each rank may start its next step
    if fetches and not net.overlap:  # the cores copy every fetch before they compute
        ready = [t0 + links] * world
    ret_at: list[dict[int, float]] = [dict() for _ in range(world)]  # step -> arrival
    ret_cost: list[dict[int, float]] = [dict() for _ in range(world)]
    for s in range(r):
        for p in range(world):
            start[p][s] = max(ready[p], arrive[p][s])
            end[p][s] = start[p][s] + comp[p][s]
        group = [(m, start[m.src][s]) for m in moves[s]]
        if s:
            group += [(m, end[m.src][s - 1]) for m in rets[s - 1]]
        durs = net.durations([(m.src, m.dst, m.nbytes) for m, _ in group])
        links += max(durs, default=0.0)
        send_busy = [0.0] * world  # without overlap: when each sender's copies end
        for (m, posted), d in zip(group, durs):
            if not net.overlap:  # the cores that compute also copy: after the compute
                posted = max(posted, end[m.src][s] if m.channel == "move" else posted)
                send_busy[m.src] = max(send_busy[m.src], posted + d)
            if m.channel == "move":
                arrive[m.dst][s + 1] = max(arrive[m.dst][s + 1], posted + d)
            else:
                ret_at[m.dst][m.step] = max(ret_at[m.dst].get(m.step, 0.0), posted + d)
                fold = _ret_fold(prof, impl, m.nbytes, itemsize, acc, phase)
                ret_cost[m.dst][m.step] = ret_cost[m.dst].get(m.step, 0.0) + fold
        for p in range(world):
            t = max(end[p][s], send_busy[p])
            if s >= 2 and (s - 1) in ret_at[p]:
                t = max(t, ret_at[p][s - 1]) + ret_cost[p][s - 1]
            ready[p] = t
    # the last step's returns: posted after its compute, in flight beside the second half
    if r > 1 and rets[r - 1]:
        durs = net.durations([(m.src, m.dst, m.nbytes) for m in rets[r - 1]])
        links += max(durs, default=0.0)
        for m, d in zip(rets[r - 1], durs):
            ret_at[m.dst][r - 1] = max(ret_at[m.dst].get(r - 1, 0.0), end[m.src][r - 1] + d)
            ret_cost[m.dst][r - 1] = (ret_cost[m.dst].get(r - 1, 0.0)
                                      + _ret_fold(prof, impl, m.nbytes, itemsize, acc, phase))
    done = []
    for p in range(world):
        t = ready[p] + last[p]
        if (r - 1) in ret_at[p] and r > 1:
            t = max(t, ret_at[p][r - 1]) + ret_cost[p][r - 1]
        done.append(t)
    total = max(done) + net.time(post)
    busy = max(sum(c) + lp for c, lp in zip(comp, last))
    timed = (sum(m[2] for m in pre + post) + sum(m.nbytes for m in fetches)
             + sum(m.nbytes for g in (moves, rets) for ms in g.values() for m in ms))
    a2a = pre_s + net.time(post)  # the per-call host cost is neither link nor all-to-all
    return PhaseResult(total, start, end, busy, a2a, timed, links + a2a)
