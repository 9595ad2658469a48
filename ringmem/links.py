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
    # gloo between processes on one CPU host (measured: 256 MiB in ~0.16 s)
    "loopback": Interconnect(name="loopback", topology="bus", bandwidth=1.6e9, latency=50e-6,
                             overlap=False),
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
    """Ranks 0..world-1 placed `per_node` to a node (0: all in one node)."""
    world: int
    intra: Interconnect
    inter: Interconnect | None = None
    per_node: int = 0

    def __post_init__(self) -> None:
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

    def time(self, msgs: list[tuple[int, int, int]]) -> float:
        """Seconds for messages (src, dst, bytes) posted together to all arrive: the most
        loaded link's bytes / bandwidth + that link's latency."""
        return self.time_of(self.load(msgs))

    def load(self, msgs: list[tuple[int, int, int]], into: dict | None = None) -> dict:
        """Bytes per link of `msgs`, added to `into` (a running load) when given."""
        load: dict = {} if into is None else into
        for s, d, b in msgs:
            if b <= 0 or s == d:
                continue
            inter = self.node(s) != self.node(d)
            ic = self.inter if inter else self.intra
            for key in _links(ic, self.world, s, d, self.per_node if not inter else 0):
                k = (inter, key)
                load[k] = (load.get(k, (0, ic))[0] + b, ic)
        return load

    @staticmethod
    def time_of(load: dict) -> float:
        return max((b / ic.bandwidth + ic.latency for b, ic in load.values()), default=0.0)


def _links(ic: Interconnect, world: int, s: int, d: int, per_node: int) -> list:
    """The links a message from s to d loads."""
    if ic.topology == "bus":
        return ["bus"]
    if ic.topology == "mesh":
        return [(s, d)]
    if ic.topology == "switch":
        return [("out", s), ("in", d)]
    # ring inside a node (or over the whole world): the shorter direction, hop by hop
    n = per_node or world
    base, a, z = (s // n) * n, s % n, d % n
    fwd = (z - a) % n
    step = 1 if fwd <= n - fwd else -1
    out, x = [], a
    while x != z:
        nxt = (x + step) % n
        out.append((base + x, base + nxt))
        x = nxt
    return out
