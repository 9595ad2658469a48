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

from ..links import Cluster

Msg = tuple[int, int, int]  # (src, dst, bytes)


class Network(Cluster):
    """A `links.Cluster` that also tells when each message of a group arrives."""

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
