"""Link model of the simulator: when each message of a group posted together arrives.

The same topologies as `ringmem.links` (mesh, switch, ring, bus; an inter-node switch
between nodes), with two additions the event simulation needs:

* per message, not per group: a message is done when the most loaded link on its path
  has drained (links shared fairly), so a small message beside a big one on other links
  is not held back by it;
* `duplex=False`: both directions of a link share one channel (a half-duplex PCIe path
  through a shared bridge), so TokenRing's two directions contend.

Contention: two directions (half duplex) or two groups (two rings, a move and a return)
that load the same link share it. Pure Python: no torch.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..links import TOPOLOGIES, Interconnect

Msg = tuple[int, int, int]  # (src, dst, bytes)


@dataclass(frozen=True)
class Network:
    """Ranks 0..world-1, `per_node` to a node (0: one node)."""
    world: int
    intra: Interconnect
    inter: Interconnect | None = None
    per_node: int = 0
    duplex: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.world, bool) or not isinstance(self.world, int) or self.world < 1:
            raise ValueError(f"world must be an int >= 1, got {self.world!r}")
        if self.per_node < 0 or (self.per_node and self.world % self.per_node):
            raise ValueError(f"per_node must divide the world size {self.world}, got "
                             f"{self.per_node!r}")
        if self.per_node and self.per_node < self.world and self.inter is None:
            raise ValueError("ranks on several nodes need an inter-node link (inter=)")
        if self.intra.topology not in TOPOLOGIES:
            raise ValueError(f"unknown topology {self.intra.topology!r}")

    @property
    def overlap(self) -> bool:
        return self.intra.overlap and (self.inter is None or self.inter.overlap)

    def node(self, rank: int) -> int:
        return rank // self.per_node if self.per_node else 0

    def path(self, src: int, dst: int) -> tuple[Interconnect, list]:
        """(the link type, the links a message src -> dst loads)."""
        inter = self.node(src) != self.node(dst)
        ic = self.inter if inter else self.intra
        assert ic is not None
        if ic.topology == "bus":
            keys = ["bus"]
        elif ic.topology == "mesh":
            keys = [(src, dst) if self.duplex else (min(src, dst), max(src, dst))]
        elif ic.topology == "switch":
            keys = ([("out", src), ("in", dst)] if self.duplex else
                    [("port", src), ("port", dst)])
        else:
            keys = self._ring_hops(src, dst, 0 if inter else self.per_node)
        return ic, [(inter, k) for k in keys]

    def _ring_hops(self, s: int, d: int, per_node: int) -> list:
        n = per_node or self.world
        base, a, z = (s // n) * n, s % n, d % n
        fwd = (z - a) % n
        step = 1 if fwd <= n - fwd else -1
        hops, x = [], a
        while x != z:
            nxt = (x + step) % n
            u, v = base + x, base + nxt
            hops.append((u, v) if self.duplex else (min(u, v), max(u, v)))
            x = nxt
        return hops

    def durations(self, msgs: list[Msg]) -> list[float]:
        """Seconds from posting to arrival of each message of a group posted together."""
        load: dict = {}
        paths = []
        for s, d, b in msgs:
            if b <= 0 or s == d:
                paths.append(None)
                continue
            ic, keys = self.path(s, d)
            paths.append((ic, keys))
            for k in keys:
                load[k] = load.get(k, 0) + b
        return [0.0 if p is None else
                p[0].latency + max(load[k] for k in p[1]) / p[0].bandwidth for p in paths]

    def time(self, msgs: list[Msg]) -> float:
        """Seconds until every message of the group has arrived."""
        return max(self.durations(msgs), default=0.0)
