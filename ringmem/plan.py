"""Cost model for every parallel option: bytes per link per step, predicted time, `auto`.

An option is a ring schedule (`kv`: K/V travel; `q`: TokenRing, Q travels and partial
outputs return; `allgather`: each rank fetches the K/V spans it uses straight from their
owners, all posted at once) combined with a Ulysses degree u (an all-to-all turns u
ranks' sequence shards into a head split before the ring and back after it; u = world is
pure Ulysses). The byte counts come from the same routing rules the ring loop and the
all-to-alls follow (`routing`, `heads`), so they are exact, not estimates: `CommStats` of
a real call equals the plan's `steps` (ring steps) and `a2a` (all-to-alls) of its option.

Time: the event-level model of the ring loop in `ringmem.timeline` (the simulator's too):
per rank and step, compute beside the transfers in flight when the links move data beside
the compute (GPU copy engines / NCCL), after them when they do not (gloo on the CPU cores
that also compute); all-gather fetches are posted together and each step waits for its
own; the all-to-alls are not overlapped. Block costs from a `KernelModel`, link times
from `links.Cluster`.

Scale: routing (`routes`) and timing (`timeline`) run on tensors over all ranks and steps,
with blocks in a few classes (`routing.block_classes`), so every option for 1024 ranks
plans in seconds (`benchmarks/plan_scale.py`); an estimate's lists are built when read.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from functools import cached_property, lru_cache
from typing import NamedTuple

import torch

from .arguments import check_flag
from .heads import heads_error, kv_heads
from .kernel_model import DEFAULT_KERNELS, KernelModel
from .links import INTERCONNECTS, Cluster, Interconnect, resolve_interconnect
from .masking import Mask, make_mask
from .options import RING_SCHEDULES, Option, check_schedule, fetches, moving_side
from .routes import Routes, a2a_sizes, route
from .routing import Geometry, best_hop
from .timeline import Impl, simulate_phase

__all__ = ["INTERCONNECTS", "Interconnect", "Estimate", "KernelModel", "Message", "Plan", "plan",
           "option_name", "parse_option", "ring_hop", "resolve_interconnect"]


class Message(NamedTuple):
    """One transfer of the plan. step: the ring step (-1: the all-to-all before the loop,
    the ring's world size: the one after it); channel: "move" (posted at `step`, used at
    step+1), "fetch" (all-gather: posted before step 0, used at `step`), "ret" (results
    sent to their owner after computing `step`) or "a2a"; src/dst: ranks of the group."""
    step: int
    channel: str
    src: int
    dst: int
    nbytes: int


def option_name(ulysses: int, world: int, schedule: str) -> str:
    """The name of Ulysses degree `ulysses` x ring `schedule` (`options.Option`)."""
    return Option(ulysses, schedule).name(world)


def parse_option(name: str, world: int) -> tuple[int, str]:
    """(Ulysses degree, ring schedule) of an option name (`options.Option`)."""
    o = Option.parse(name, world)
    return o.ulysses, o.schedule


def ring_hop(layout: str, ring_world: int, q_len: int, kv_len: int, mask: Mask,
             schedule: str, fold: int = 1) -> int:
    """The ring direction the loop uses for this call (one rule for the plan and the loop)."""
    return best_hop(layout, ring_world, q_len, kv_len, mask, moving_side(schedule), fold)


@dataclass(frozen=True, eq=False)
class Estimate:
    """One option's prediction: its time and, from its routing (`routes.Routes`, tensors),
    these views as lists (built when first read): steps[phase][rank][step] = (bytes sent,
    bytes received) in the ring loop; a2a[phase][rank] the same for the all-to-alls (zero
    without Ulysses); messages[phase] every transfer; pairs[rank][step] = (query, key)
    pairs that rank computes at that step, over the batch (the same in both phases);
    work[rank][step] its pieces as (rows, keys, pairs per batch row: a piece of one row
    counts its share); halves[rank] the own block's work split at its middle row (the
    loop's split when results return: the second half hides the last return); heads =
    (query heads, most K/V heads) per rank."""
    schedule: str
    time_s: float
    comm_s: float
    compute_s: float
    routes: Routes
    ulysses: int = 1
    ring: str = "kv"
    heads: tuple[int, int] = (0, 0)
    batch: int = 1
    head_dim: int = 0
    buffer_bytes: int = 0  # received inputs alive at once on the busiest rank, any phase

    def copy(self) -> Estimate:
        """A fresh estimate whose list views a caller may edit without touching the cached
        one (the views are built per instance; the routing tensors are only read)."""
        return replace(self)

    @cached_property
    def steps(self) -> dict[str, list[list[tuple[int, int]]]]:
        return {ph: [[(a, b) for a, b in rank] for rank in t.tolist()]
                for ph, t in self.routes.steps.items()}

    @cached_property
    def a2a(self) -> dict[str, list[tuple[int, int]]]:
        return {ph: [(a, b) for a, b in t.tolist()] for ph, t in self.routes.a2a.items()}

    @cached_property
    def messages(self) -> dict[str, list[Message]]:
        return {ph: [Message(*m) for m in t.tuples()]
                for ph, t in self.routes.messages.items()}

    @cached_property
    def pairs(self) -> list[list[int]]:
        return self.routes.pairs.tolist()

    @cached_property
    def work(self) -> list[list[tuple[tuple[int, int, float], ...]]]:
        return self.routes.work.lists()

    @cached_property
    def halves(self) -> list[tuple[tuple[tuple[int, int, float], ...], ...]]:
        return list(self.routes.work.halves)

    def bytes(self, phase: str | None = None) -> int:
        """Total bytes sent by all ranks (in `phase`, or both), all-to-alls included."""
        return sum(int(t[..., 0].sum()) for d in (self.routes.steps, self.routes.a2a)
                   for ph, t in d.items() if phase in (None, ph))


@dataclass
class Plan:
    choice: str
    schedules: dict[str, Estimate] = field(default_factory=dict)  # every option, by name

    def __str__(self) -> str:
        lines = [f"parallel plan: choose {self.choice!r}"]
        for name, e in self.schedules.items():
            lines.append(f"  {name:>16}: {e.time_s * 1e3:9.3f} ms predicted (compute "
                         f"{e.compute_s * 1e3:.3f} ms, comm {e.comm_s * 1e3:.3f} ms), "
                         f"{e.bytes() / 2**20:.2f} MiB sent in all")
        return "\n".join(lines)


@lru_cache(maxsize=256)
def _estimate(name: str, layout: str, world: int, q_shape: tuple, kv_shape: tuple,
              itemsize: int, acc_size: int, mask: Mask, backward: bool, cluster: Cluster,
              kernel: KernelModel, return_lse: bool) -> Estimate:
    u, schedule = parse_option(name, world)
    r = world // u
    b, sq, hq, d = q_shape
    skv, hkv = kv_shape[1], kv_shape[2]
    hl, kvn = hq // u, [len(h) for h in kv_heads(hq, hkv, u)]
    moving = moving_side(schedule)
    geo = Geometry.uniform(layout, r, u * sq, u * skv, mask, moving,
                           ring_hop(layout, r, u * sq, u * skv, mask, schedule, u), u,
                           fetches(schedule))
    # bytes per row (Q side) or key (K/V side, per ulysses rank i) of what moves and returns
    q_row = {"fwd": b * hl * d * itemsize, "bwd": b * hl * (3 * d * itemsize + acc_size)}
    kv_row = [2 * b * n * d * itemsize for n in kvn]
    ret_row = {("q", "fwd"): [b * hl * (d * itemsize + acc_size)] * u,  # partial out + lse
               ("q", "bwd"): [b * hl * d * acc_size] * u,                # dq
               ("kv", "fwd"): [0] * u,
               ("kv", "bwd"): [2 * b * n * d * acc_size for n in kvn]}   # dk, dv
    phases = ("fwd", "bwd") if backward else ("fwd",)
    rows = {ph: ([q_row[ph]] * u if moving == "q" else kv_row, ret_row[(moving, ph)])
            for ph in phases}
    sizes = {ph: a2a_sizes(ph, b, sq, skv, hl, d, itemsize, acc_size, return_lse)
             for ph in phases}
    routes = route(geo, u, phases, rows, sizes, kvn, b, getattr(kernel, "dense_bands", False),
                   getattr(kernel, "cpu_tiles", False))
    # each tensor through an all-to-all is copied ~3 times on its rank (packed, joined,
    # put in position order); the busiest rank's copies add to the exchange
    copies_s = {ph: 3 * sum(z["q_in"] + z["q_out"] + (z["kv_in"] + z["kv_out"]) * n
                            for n in kvn) / kernel.copy_bw if u > 1 else 0.0
                for ph, z in sizes.items()}
    est = Estimate(name, 0.0, 0.0, 0.0, routes, u, schedule, (hl, max(kvn)), b, d,
                   routes.buffers)
    # the loop's merges and sums are not in plan()'s model until measured per backend;
    # the simulator passes them (`Impl.ringmem`)
    impl = Impl("none", 0.0, 0.0)
    time_s = comm_s = compute_s = 0.0
    for phase in phases:
        res = simulate_phase(est, phase, kernel, cluster, itemsize=itemsize, acc=acc_size,
                             impl=impl)
        time_s += res.time_s + copies_s[phase]
        comm_s += res.links_s + copies_s[phase]
        compute_s += res.compute_s
    return replace(est, time_s=time_s, comm_s=comm_s, compute_s=compute_s)


def _degrees(ulysses: object, world: int, hq: int) -> tuple[int, ...]:
    if ulysses == "auto":
        return tuple(u for u in range(1, world + 1)
                     if world % u == 0 and heads_error(hq, 0, u) is None)
    us = ulysses if isinstance(ulysses, tuple) else (ulysses,)
    for u in us:
        if isinstance(u, bool) or not isinstance(u, int) or u < 1 or world % u:
            raise ValueError(f"ulysses must be 'auto' or a degree dividing the world size "
                             f"{world}, got {u!r}")
        err = heads_error(hq, 0, u)
        if err:
            raise ValueError(err)
    return tuple(us)


def plan(q_shape: tuple[int, ...], kv_shape: tuple[int, ...], *, world: int,
         dtype: torch.dtype = torch.bfloat16, causal: bool = True, layout: str = "zigzag",
         interconnect: str | Interconnect | None = None, device_type: str = "cuda",
         flops: float | None = None, backward: bool = False,
         window: tuple[int, int] = (-1, -1), cu_seqlens: object = None,
         mask: Mask | None = None, ulysses: int | str | tuple[int, ...] = 1,
         schedule: str = "auto", inter_node: str | Interconnect | None = None,
         gpus_per_node: int = 0, return_lse: bool = False,
         kernel: KernelModel | None = None) -> Plan:
    """Predict every option for one call and choose the fastest.

    q_shape [B, S_local, Hq, D], kv_shape [B, S_local_kv, Hkv, D] are the per-rank shards;
    `window` and `cu_seqlens` as for `ring_attention` (skipped blocks cost nothing); a
    prepared `mask` (`ringmem.masking.Mask`) replaces causal, window and cu_seqlens.
    ulysses: a degree, a tuple of degrees or "auto" (every degree dividing the world and
    the query heads); schedule: a ring schedule or "auto" (all of them). interconnect links
    the ranks of a node, inter_node (e.g. "ib") the nodes of `gpus_per_node` ranks each
    (0: one node). kernel: the block time model (`KernelModel`, or any object with its
    `block_s`, `epilogue_s` and `all_to_all`, `timeline.BlockTimes`: e.g. a measured
    `sim.Profile`); default by device type, `flops` replacing its rate (on the CPU, the
    ranks of a node share `os.cpu_count()` cores: `KernelModel.on_node`). Returns a Plan
    with every option's bytes per rank per step and predicted time; `str(plan)` explains
    the choice. Where communication overlaps compute, within 1% predicted time the option
    with less buffers (an all-gather holds every K/V span it uses at once), then the one
    with less communication (it leaves more slack); exact ties go to the first listed.
    """
    if len(q_shape) != 4 or len(kv_shape) != 4:
        raise ValueError(f"q_shape and kv_shape must be [B, S, H, D], got {q_shape}, {kv_shape}")
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be an int >= 1, got {world!r}")
    for name, flag in (("causal", causal), ("backward", backward), ("return_lse", return_lse)):
        check_flag(name, flag)
    check_schedule(schedule)
    ic = resolve_interconnect(interconnect, device_type)
    inter = None if inter_node is None else resolve_interconnect(inter_node, device_type,
                                                                  "inter_node")
    if kernel is None:
        kernel = DEFAULT_KERNELS.get(device_type, DEFAULT_KERNELS["cpu"])
        if flops is not None:
            if not flops > 0:
                raise ValueError(f"flops must be > 0, got {flops}")
            kernel = replace(kernel, flops=float(flops))
        if device_type == "cpu":  # gloo ranks share this machine's cores
            kernel = replace(kernel, cores=os.cpu_count() or 1)
    if isinstance(kernel, KernelModel):
        per_node = gpus_per_node or world
        if kernel.shared_latency and kernel.cores and per_node > kernel.cores:
            ic = replace(ic, latency=ic.latency * per_node / kernel.cores)
        kernel = replace(kernel.on_node(per_node), agree_s=(),
                         call_s=kernel.call_s + kernel.agreement(world))
    cluster = Cluster(world, ic, inter, gpus_per_node)
    itemsize = torch.empty((), dtype=dtype).element_size()
    acc = 8 if dtype == torch.float64 else 4
    if mask is None:
        mask = make_mask(causal, window, cu_seqlens, q_shape[0], layout, world, q_shape[1])
    names = []
    for u in _degrees(ulysses, world, q_shape[2]):
        for s in (RING_SCHEDULES if schedule == "auto" else (schedule,)):
            n = option_name(u, world, s)
            if n not in names:
                names.append(n)
    # copies: the cached estimates must not change when a caller edits its plan
    ests = {n: _estimate(n, layout, world, tuple(q_shape), tuple(kv_shape), itemsize, acc,
                         mask, backward, cluster, kernel, return_lse).copy() for n in names}
    fastest = min(e.time_s for e in ests.values())
    # a tie only where communication hides behind compute (else the bytes are the time)
    tol = 0.01 if cluster.overlap else 0.0
    close = [n for n in names if ests[n].time_s <= fastest * (1 + tol)]
    return Plan(min(close, key=lambda n: (ests[n].buffer_bytes, ests[n].comm_s,
                                          names.index(n))), ests)
