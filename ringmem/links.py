"""Link models for the cost model: how long one stage's messages take to arrive.

Topologies (bandwidth is bytes/s per link and direction, latency s per message):

* `mesh`: every ordered pair of ranks has its own full-duplex link (NVLink full mesh):
  sending to two different peers costs the larger of the two, not the sum.
* `switch`: each rank has one full-duplex port into a non-blocking switch (NVSwitch, an
  InfiniBand NIC per GPU): a rank's sends share its egress, its receives its ingress.
* `ring`: links only between ring neighbours, full duplex (PCIe ring): a message to a rank
  d hops away loads d links (shortest direction).
* `bus`: all transfers share one channel (processes on one host, gloo loopback).

A `Cluster` places ranks on nodes of `per_node` ranks: messages inside a node use the
intra-node link, messages between nodes the inter-node one (a `switch` of NIC ports).
`duplex=False`: both directions of a link share one channel (a half-duplex PCIe path
through a shared bridge), so TokenRing's two directions contend. Contention: messages of
one group posted together that load the same link share it (`time`: when the whole group
has arrived; `durations`: when each message has).
"""
from __future__ import annotations

from dataclasses import dataclass

TOPOLOGIES = ("mesh", "switch", "ring", "bus")


@dataclass(frozen=True, kw_only=True)
class Interconnect:
    """A link model. bandwidth: bytes/s per link and direction; latency: s per message;
    overlap: transfers proceed while the ranks compute (False when the same cores copy)."""
    name: str
    topology: str  # one of TOPOLOGIES
    bandwidth: float
    latency: float
    overlap: bool = True

    def __post_init__(self) -> None:
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"topology must be one of {TOPOLOGIES}, got {self.topology!r}")
        if not self.bandwidth > 0 or not self.latency >= 0:
            raise ValueError(f"bandwidth must be > 0 and latency >= 0, got {self.bandwidth}, "
                             f"{self.latency}")


INTERCONNECTS = {
    # H100 SXM NVLink 4: ~450 GB/s per direction peak, ~350 reached by P2P; as a full mesh
    "nvlink": Interconnect(name="nvlink", topology="mesh", bandwidth=350e9, latency=10e-6),
    # the same GPUs behind NVSwitch (DGX/HGX): one port per GPU shared by all its peers
    "nvswitch": Interconnect(name="nvswitch", topology="switch", bandwidth=350e9,
                             latency=10e-6),
    # PCIe Gen4 x16 between neighbours: ~25 GB/s per direction
    "pcie": Interconnect(name="pcie", topology="ring", bandwidth=25e9, latency=20e-6),
    # InfiniBand NDR, one 400 Gb/s NIC per GPU: ~45 GB/s per direction reached
    "ib": Interconnect(name="ib", topology="switch", bandwidth=45e9, latency=5e-6),
    # gloo between processes on one CPU host, fitted with the CPU kernel model
    # (`kernel_model.DEFAULT_KERNELS`): 2.72 GB/s and 1.14 ms a message: mostly the wait for
    # a peer process that shares a core
    "loopback": Interconnect(name="loopback", topology="bus", bandwidth=2.72e9,
                             latency=1.14e-3, overlap=False),
}


def resolve_interconnect(ic: str | Interconnect | None, device_type: str,
                         name: str = "interconnect") -> Interconnect:
    if ic is None:
        return INTERCONNECTS["nvlink" if device_type == "cuda" else "loopback"]
    if isinstance(ic, Interconnect):
        return ic
    if isinstance(ic, str) and ic in INTERCONNECTS:
        return INTERCONNECTS[ic]
    raise ValueError(f"{name} must be one of {tuple(INTERCONNECTS)} or an Interconnect, "
                     f"got {ic!r}")


@dataclass(frozen=True)
class Cluster:
    """Ranks 0..world-1 placed `per_node` to a node (0: all in one node). duplex=False:
    both directions of a link share one channel (a half-duplex path)."""
    world: int
    intra: Interconnect
    inter: Interconnect | None = None
    per_node: int = 0
    duplex: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.world, bool) or not isinstance(self.world, int) or self.world < 1:
            raise ValueError(f"world must be an int >= 1, got {self.world!r}")
        if self.per_node < 0 or (self.per_node and self.world % self.per_node):
            raise ValueError(f"gpus_per_node must divide the world size {self.world}, got "
                             f"{self.per_node}")
        if self.per_node and self.per_node < self.world and self.inter is None:
            raise ValueError("ranks on several nodes need an inter_node link")

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
        two = (lambda a, b: (a, b)) if self.duplex else (lambda a, b: (min(a, b), max(a, b)))
        if ic.topology == "bus":
            keys: list = ["bus"]
        elif ic.topology == "mesh":
            keys = [two(src, dst)]
        elif ic.topology == "switch":
            keys = [("out", src), ("in", dst)] if self.duplex else [("port", src),
                                                                     ("port", dst)]
        else:  # a ring inside a node (or over the world): the shorter way, hop by hop
            n = (0 if inter else self.per_node) or self.world
            base, a, z = (src // n) * n, src % n, dst % n
            step = 1 if (z - a) % n <= n - (z - a) % n else -1
            keys, x = [], a
            while x != z:
                keys.append(two(base + x, base + (x + step) % n))
                x = (x + step) % n
        return ic, [(inter, k) for k in keys]

    def time(self, msgs: list[tuple[int, int, int]]) -> float:
        """Seconds for messages (src, dst, bytes) posted together to all arrive: the most
        loaded link's bytes / bandwidth + that link's latency."""
        return self.time_of(self.load(msgs))

    def durations(self, msgs: list[tuple[int, int, int]]) -> list[float]:
        """Seconds from posting to arrival of each message of a group posted together: a
        message is done when the most loaded link on its path has drained (links shared
        fairly), so a small message beside a big one on other links is not held back."""
        return self.arrivals(msgs, self.load(msgs))

    def arrivals(self, msgs: list[tuple[int, int, int]], load: dict) -> list[float]:
        """`durations` of `msgs` on links loaded by `load` (which holds them, and may hold
        messages posted with them earlier: a running load)."""
        out = []
        for s, d, b in msgs:
            if b <= 0 or s == d:
                out.append(0.0)
                continue
            ic, keys = self.path(s, d)
            out.append(ic.latency + max(load[k][0] for k in keys) / ic.bandwidth)
        return out

    def load(self, msgs: list[tuple[int, int, int]], into: dict | None = None) -> dict:
        """Bytes per link of `msgs`, added to `into` (a running load) when given."""
        load: dict = {} if into is None else into
        for s, d, b in msgs:
            if b <= 0 or s == d:
                continue
            ic, keys = self.path(s, d)
            for k in keys:
                load[k] = (load.get(k, (0, ic))[0] + b, ic)
        return load

    @staticmethod
    def time_of(load: dict) -> float:
        return max((b / ic.bandwidth + ic.latency for b, ic in load.values()), default=0.0)
