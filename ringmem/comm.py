"""Ring communication: one small object, asynchronous P2P, the same code on gloo and NCCL.

Two channels: `move` passes the travelling half of the attention problem one hop (backward,
rank r -> r-1, or forward), `ret` returns results straight to their owner on a second process
group, so both directions of every link carry data at once and neither queues behind the other.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from .timeouts import comm_error, group_timeout, wait_works

Group = dist.ProcessGroup | None

_RETURN_GROUPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CONTROL_GROUPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def group_rank_world(group: Group) -> tuple[int, int]:
    """(rank, world size) of this process in `group`; (0, 1) with no process group at all."""
    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise ValueError("group was given but torch.distributed is not initialised")
        return 0, 1
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, "
                        f"got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the given group")
    return rank, dist.get_world_size(group)


def device_error(group: Group, device: torch.device, name: str = "q") -> ValueError | None:
    """A ValueError naming `device` when `group` (world > 1) cannot carry tensors on it
    (meta tensors; CUDA tensors on a CPU-only group): found before the first transfer,
    whose error ("No backend type associated with device type ...") names nothing."""
    g = group if group is not None else dist.group.WORLD
    types = [d.type for d in getattr(g, "_device_types", None) or ()]  # no public accessor
    if not types or device.type in types:
        return None
    return ValueError(f"{name} is on device {device}, which the process group "
                      f"({dist.get_backend(g)}) cannot communicate: it carries "
                      f"{', '.join(types)} tensors (meta tensors cannot run a multi-rank "
                      f"ring)")


def gather_rows(x: Tensor, group: Group, world: int, op: str = "all-gather",
                bounded: bool = True) -> Tensor:
    """All-gather a 1-D tensor from every rank into [world, n] (one collective).

    On the CPU (gloo) the host wait is bounded by `timeouts.current()` and a failure names
    `op` and the peers; a device gather is left asynchronous (its group's timeout applies),
    and so is every gather with `bounded=False` (one plain call, which graphs can hold).
    """
    out = torch.empty(world * x.numel(), dtype=x.dtype, device=x.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    if x.device.type != "cpu" or not dist.is_initialized() or not bounded:
        gather(out, x.contiguous(), group=group)
        return out.reshape(world, -1)
    work = gather(out, x.contiguous(), group=group, async_op=True)
    me = dist.get_rank()
    peers = [p for p in dist.get_process_group_ranks(group or dist.group.WORLD) if p != me]
    wait_works([work], [("all-gather", p) for p in peers], op=op, rank=me, timed=True)
    return out.reshape(world, -1)


def control_group(group: Group) -> Group:
    """A group over the same ranks whose collectives move CPU tensors (gloo): `group` itself
    when it is gloo, else a gloo twin created once (collective over the group's members).

    Cross-rank checks (`agree`, the decode step's agreement) travel here: the host reads
    their result without synchronising with the GPU, so the launch queue keeps running.
    """
    if not dist.is_available() or not dist.is_initialized():
        return group
    g = group if group is not None else dist.group.WORLD
    if dist.get_backend(g) == "gloo":
        return group
    twin = _CONTROL_GROUPS.get(g)
    if twin is None:
        twin = cpu_twin(g)
        _CONTROL_GROUPS[g] = twin
    return twin


def cpu_twin(group: dist.ProcessGroup) -> dist.ProcessGroup:
    """A new gloo group over `group`'s ranks. Only the members call this (local
    synchronisation: the group's name is derived from its ranks, not from a per-process
    counter that non-members would have to advance too)."""
    return dist.new_group(dist.get_process_group_ranks(group), backend="gloo",
                          use_local_synchronization=True, timeout=group_timeout())


RET_TAG = 1  # returns use their own tag when they share the ring's group


def _return_group(group: dist.ProcessGroup, device: torch.device) -> dist.ProcessGroup:
    """The group that carries returns: a second group over every rank for the default
    group (created once, by all ranks: they are all in this call), else `group` itself.

    A second group for a sub-group would have to be created by every process in the world
    (torch names groups from a per-process counter, so local creation can disagree and
    hang); there the returns share the ring's group under their own tag, which is exact on
    gloo and NCCL alike and only gives up NCCL's concurrency of the two directions.
    """
    if group is not dist.group.WORLD:
        return group
    rg = _RETURN_GROUPS.get(group)
    if rg is None:
        rg = dist.new_group(dist.get_process_group_ranks(group), timeout=group_timeout())
        # NCCL needs every rank in a communicator's first operation; a return exchange may
        # be empty on some ranks, so open it with a collective all members take part in
        dist.all_reduce(torch.zeros(1, device=device), group=rg)
        _RETURN_GROUPS[group] = rg
    return rg


@dataclass
class CommStats:
    """Bytes this rank sent and received, per call phase, step and channel.

    Pass one to `ring_attention(..., stats=...)`; records are dicts with keys
    phase ("fwd"/"bwd"), step, channel ("move", "ret", "fetch" or "a2a"), sent, recv.
    """
    records: list[dict] = field(default_factory=list)

    def total(self, phase: str | None = None, channel: str | None = None) -> tuple[int, int]:
        rs = [r for r in self.records if phase in (None, r["phase"])
              and channel in (None, r["channel"])]
        return sum(r["sent"] for r in rs), sum(r["recv"] for r in rs)

    def per_step(self, phase: str, ring: bool = False) -> dict[int, tuple[int, int]]:
        """{step: (sent, recv)} summed over channels; ring=True: the ring loop's channels
        only (Ulysses all-to-alls, channel "a2a", are at steps -1 and the ring's size)."""
        out: dict[int, tuple[int, int]] = {}
        for r in self.records:
            if r["phase"] == phase and not (ring and r["channel"] == "a2a"):
                s, v = out.get(r["step"], (0, 0))
                out[r["step"]] = (s + r["sent"], v + r["recv"])
        return out


def _nbytes(ts: list[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


class Transfers(list):
    """The works of one posted batch, with what `RingComm.wait` needs to name a failure:
    the step, the channel and a (what, peer rank) label per transfer."""

    def __init__(self, works: list, step: int, channel: str,
                 labels: list[tuple[str, int]]) -> None:
        super().__init__(works)
        self.step, self.channel, self.labels = step, channel, labels


@dataclass
class RingComm:
    """Posts transfers without blocking; `wait` blocks only on the buffers about to be used.

    `move(send, recv)`: send to rank-1, receive from rank+1. `ret(send, to, recv, frm)`:
    send to / receive from arbitrary ranks (offsets within the group) on the return group.
    """
    group: Group
    phase: str = "fwd"
    stats: CommStats | None = None
    device: torch.device = torch.device("cpu")  # where the tensors live (NCCL: the GPU)
    rank: int = 0
    world: int = 1
    op: str = "ring_attention"  # named in errors, with the phase, step and peer

    def __post_init__(self) -> None:
        self.rank, self.world = group_rank_world(self.group)
        self._g = self.group if self.group is not None else (
            dist.group.WORLD if self.world > 1 else None)
        self._ret_g: dist.ProcessGroup | None = None

    def _peer(self, offset: int) -> int:
        return dist.get_global_rank(self._g, (self.rank + offset) % self.world)

    def _post(self, step: int, channel: str, group: dist.ProcessGroup, send: list[Tensor],
              to: int, recv: list[Tensor], frm: int, tag: int = 0) -> Transfers:
        dst, src = (self._peer(to), self._peer(frm)) if send or recv else (0, 0)
        ops = [dist.P2POp(dist.isend, t, dst, group, tag) for t in send]
        ops += [dist.P2POp(dist.irecv, t, src, group, tag) for t in recv]
        if self.stats is not None:
            self.stats.records.append({"phase": self.phase, "step": step, "channel": channel,
                                       "sent": _nbytes(send), "recv": _nbytes(recv)})
        labels = ([(f"{channel} send", dst)] * len(send) +
                  [(f"{channel} receive", src)] * len(recv))
        return Transfers(dist.batch_isend_irecv(ops) if ops else [], step, channel, labels)

    def move(self, step: int, send: list[Tensor], recv: list[Tensor],
             hop: int = 1) -> Transfers:
        """hop=+1: send to rank-1, receive from rank+1; hop=-1: the other way round."""
        return self._post(step, "move", self._g, send, -hop, recv, +hop)

    def fetch(self, step: int, send: list[Tensor], to: int, recv: list[Tensor],
              frm: int) -> Transfers:
        """The all-gather schedule's direct transfer for `step` (offsets within the group)."""
        return self._post(step, "fetch", self._g, send, to, recv, frm)

    def p2p(self, step: int, send: list[Tensor], to: int, recv: list[Tensor],
            frm: int) -> Transfers:
        """Send to / receive from arbitrary ranks (offsets within the group) on the ring's
        own group: point-to-point moves outside the ring loop (cache rebalancing)."""
        return self._post(step, "p2p", self._g, send, to, recv, frm)

    def prepare_returns(self) -> None:
        """Set up the return channel before the loop (it may create a group: collective).
        A peer that never joins (it skipped this call) raises `CommError` naming the op,
        not torch's bare "Wait timeout" of `new_group`."""
        if self._ret_g is None and self.world > 1:
            t0 = time.monotonic()
            try:
                self._ret_g = _return_group(self._g, self.device)
            except RuntimeError as e:  # DistBackendError and "Wait timeout" alike
                peers = [p for p in dist.get_process_group_ranks(self._g)
                         if p != dist.get_rank()]
                raise comm_error(e, op=self.op, phase=self.phase, peers=peers,
                                 rank=dist.get_rank(), what="creating the return channel's "
                                 "process group", elapsed=time.monotonic() - t0,
                                 limit=group_timeout().total_seconds()) from e

    def ret(self, step: int, send: list[Tensor], to: int, recv: list[Tensor],
            frm: int) -> Transfers:
        self.prepare_returns()
        tag = RET_TAG if self._ret_g is self._g else 0
        return self._post(step, "ret", self._ret_g, send, to, recv, frm, tag)

    def wait(self, works: Transfers | list[dist.Work] | None) -> None:
        """Wait for posted transfers; on gloo bounded by `timeouts.current()`. A failure
        raises `CommError` / `CommTimeoutError` naming the op, phase, step and peer."""
        if not works:
            return
        step = getattr(works, "step", None)
        labels = getattr(works, "labels", None) or [("transfer", -1)]
        wait_works(works, labels, op=self.op, rank=dist.get_rank(), phase=self.phase,
                   step=step, timed=self.device.type == "cpu")
