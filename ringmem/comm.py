"""Ring communication: one small object, asynchronous P2P, the same code on gloo and NCCL."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

Group = dist.ProcessGroup | None


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


@dataclass
class RingComm:
    """Sends to the next rank and receives from the previous one, without blocking.

    The caller owns the buffers and double-buffers them: `exchange` posts the transfer and
    returns at once, `wait` blocks only on the transfer whose buffer is about to be used.
    `traffic` records (bytes sent, bytes received) per exchange.
    """
    group: Group
    rank: int = 0
    world: int = 1
    traffic: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rank, self.world = group_rank_world(self.group)
        if self.world > 1:
            g = self.group if self.group is not None else dist.group.WORLD
            self._next = dist.get_global_rank(g, (self.rank + 1) % self.world)
            self._prev = dist.get_global_rank(g, (self.rank - 1) % self.world)

    def exchange(self, send: Tensor, recv: Tensor) -> list[dist.Work]:
        """Post send(next) and recv(prev); both ranks of a pair post in the same order."""
        ops = [dist.P2POp(dist.isend, send, self._next, self.group),
               dist.P2POp(dist.irecv, recv, self._prev, self.group)]
        self.traffic.append((send.numel() * send.element_size(),
                             recv.numel() * recv.element_size()))
        return dist.batch_isend_irecv(ops)

    @staticmethod
    def wait(works: list[dist.Work] | None) -> None:
        for w in works or ():
            w.wait()
