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
has arrived; `durations`: when each message has). Messages are tensors of ranks and bytes
(`Cluster.edges` lists every link each loads), so a step of a 1024-rank ring is a few
tensor operations, and many groups go at once (`durations_of(group=...)`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

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
    # (`kernel_model.DEFAULT_KERNELS`): 2.56 GB/s and 0.69 ms a message: mostly the wait for
    # a peer process that shares a core (measured alone between 2 ranks on 2 cores: 0.24 ms,
    # `ringmem bench calibrate --host`)
    "loopback": Interconnect(name="loopback", topology="bus", bandwidth=2.56e9,
                             latency=0.69e-3, overlap=False),
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

    def edges(self, src: Tensor, dst: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The links messages src -> dst load (int64 tensors of ranks), all at once:
        (message index, link key) per loaded link, and each message's bandwidth and
        latency. A message to itself loads nothing."""
        w = self.world
        m = torch.arange(len(src))
        inter = ((src // self.per_node) != (dst // self.per_node) if self.per_node
                 else torch.zeros(len(src), dtype=torch.bool))
        bw = torch.empty(len(src), dtype=torch.float64)
        lat = torch.empty(len(src), dtype=torch.float64)
        idx, keys = [], []
        for flag, ic in ((False, self.intra), (True, self.inter)):
            sel = (inter == flag) & (src != dst)
            if ic is None or not bool(sel.any()):
                continue
            bw[inter == flag], lat[inter == flag] = ic.bandwidth, ic.latency
            i, a, z = m[sel], src[sel], dst[sel]
            code = lambda kind, x, y, f=int(flag): ((f * 4 + kind) * w + x) * w + y  # noqa: E731
            two = (lambda x, y: (x, y)) if self.duplex else (  # noqa: E731
                lambda x, y: (torch.minimum(x, y), torch.maximum(x, y)))
            if ic.topology == "bus":
                idx.append(i)
                keys.append(code(0, 0, 0) + 0 * i)
            elif ic.topology == "mesh":
                idx.append(i)
                keys.append(code(1, *two(a, z)))
            elif ic.topology == "switch":  # egress and ingress ports (one port: half duplex)
                idx += [i, i]
                keys += [code(2, a, 0), code(2 if not self.duplex else 3, z, 0)]
            else:  # a ring inside a node (or over the world): the shorter way, hop by hop
                n = (0 if flag else self.per_node) or w
                base, x0, fwd = (a // n) * n, a % n, (z - a) % n
                step = torch.where(fwd <= n - fwd, 1, -1)
                hops = torch.where(step > 0, fwd, n - fwd)
                rep = lambda t, h=hops: t.repeat_interleave(h)  # noqa: E731
                first = torch.cumsum(hops, 0) - hops
                k = torch.arange(int(hops.sum())) - rep(first)
                x = (rep(x0) + rep(step) * k) % n
                y = (x + rep(step)) % n
                idx.append(rep(i))
                keys.append(code(1, *two(rep(base) + x, rep(base) + y)))
        if not idx:
            return (torch.zeros(0, dtype=torch.long),) * 2 + (bw, lat)
        return torch.cat(idx), torch.cat(keys), bw, lat

    def _loaded(self, src: Tensor, dst: Tensor, nbytes: Tensor) -> tuple:
        """(messages that load a link, then `edges` of those: message index, link key,
        bandwidth, latency; and each edge's bytes), or None when none does."""
        live = (nbytes > 0) & (src != dst)
        if not bool(live.any()):
            return None
        i, k, bw, lat = self.edges(src[live], dst[live])
        return live, i, k, bw, lat, nbytes[live][i]

    @staticmethod
    def _arrivals(n: int, loaded: tuple, on: Tensor) -> Tensor:
        """Each message's latency + the most bytes on any link of its path (`on`: per edge)
        / its bandwidth; 0 for a message that loads no link."""
        out = torch.zeros(n, dtype=torch.float64)
        live, i, _, bw, lat, _ = loaded
        most = torch.zeros(len(bw), dtype=torch.int64).scatter_reduce(0, i, on, "amax")
        out[live] = lat + most.double() / bw
        return out

    def durations_of(self, src: Tensor, dst: Tensor, nbytes: Tensor,
                     group: Tensor | None = None) -> Tensor:
        """Seconds from posting to arrival of each message of a group posted together
        (tensors): a message is done when the most loaded link on its path has drained
        (links shared fairly), so a small message beside a big one on other links is not
        held back. group: a group per message (ints >= 0), for several groups at once,
        each sharing links only within itself."""
        loaded = self._loaded(src, dst, nbytes)
        if loaded is None:
            return torch.zeros(len(src), dtype=torch.float64)
        live, i, k, _, _, nb = loaded
        if group is not None:  # a link of another group is another link
            k = k * (int(group.max()) + 1) + group[live][i]
        _, at = torch.unique(k, return_inverse=True)
        on = torch.zeros(len(k), dtype=torch.int64).index_add_(0, at, nb)[at]
        return self._arrivals(len(src), loaded, on)

    def queued_durations(self, src: Tensor, dst: Tensor, nbytes: Tensor, order: Tensor
                         ) -> Tensor:
        """`durations_of` for messages posted at once whose bytes queue by `order` (ints
        >= 0): a message's links carry every message of an equal or lower order (an
        all-gather's fetches: step s's data behind the earlier steps')."""
        loaded = self._loaded(src, dst, nbytes)
        if loaded is None:
            return torch.zeros(len(src), dtype=torch.float64)
        live, i, k, _, _, nb = loaded
        o = order[live][i]
        span = int(o.max()) + 1
        uniq, at = torch.unique(k * span + o, return_inverse=True)  # (link, order), sorted
        sums = torch.zeros(len(uniq), dtype=torch.int64).index_add_(0, at, nb)
        total = torch.cumsum(sums, 0)
        _, seg, counts = torch.unique_consecutive(uniq // span, return_inverse=True,
                                                  return_counts=True)
        first = torch.cumsum(counts, 0) - counts  # each link's first (link, order)
        cum = total - (total - sums)[first][seg]  # bytes on the link up to that order
        return self._arrivals(len(src), loaded, cum[at])

    def time_of(self, src: Tensor, dst: Tensor, nbytes: Tensor) -> float:
        """Seconds for messages (tensors) posted together to all arrive: the most loaded
        link's bytes / bandwidth + that link's latency (no bytes: 0)."""
        loaded = self._loaded(src, dst, nbytes)
        if loaded is None:
            return 0.0
        _, _, k, _, _, nb = loaded
        keys, at = torch.unique(k, return_inverse=True)
        load = torch.zeros(len(keys), dtype=torch.int64).index_add_(0, at, nb)
        inter = (keys // (4 * self.world * self.world) > 0).long()  # `edges`' key layout
        ics = (self.intra, self.inter or self.intra)
        bw = torch.tensor([ic.bandwidth for ic in ics], dtype=torch.float64)[inter]
        lat = torch.tensor([ic.latency for ic in ics], dtype=torch.float64)[inter]
        return float((load.double() / bw + lat).max())

    def time(self, msgs: list[tuple[int, int, int]]) -> float:
        """Seconds for messages (src, dst, bytes) posted together to all arrive: the most
        loaded link's bytes / bandwidth + that link's latency."""
        return self.time_of(*_columns(msgs))

    def durations(self, msgs: list[tuple[int, int, int]]) -> list[float]:
        """`durations_of` for a list of messages (src, dst, bytes)."""
        return self.durations_of(*_columns(msgs)).tolist()


def _columns(msgs: list[tuple[int, int, int]]) -> tuple[Tensor, Tensor, Tensor]:
    t = torch.tensor(msgs, dtype=torch.int64).reshape(-1, 3)
    return t[:, 0], t[:, 1], t[:, 2]
