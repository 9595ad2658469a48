"""The cache as the eviction coordinator sees it (`ringmem.eviction.view.EvictionView`):
per-head entries of this rank, the replicated counts, keep masks applied here (evicted
entries handed to the action first), and rebalancing moves over `RingComm`."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..agree import agree
from ..comm import Group, RingComm
from ..eviction.actions import EvictionAction
from ..eviction.view import Dims, HeadEntries
from .index import CacheIndex
from .paged import PagedStore


def _where(st: PagedStore, seq: int, h: int) -> slice | Tensor:
    """Head h's slots of `seq`: a slice when they are one run (views, no copy of K/V), else
    their index (`PagedStore.head_slots`)."""
    runs = st.runs(seq, h)
    if len(runs) <= 1:
        lo, hi = runs[0] if runs else (0, 0)
        return slice(lo, hi)
    return st.head_slots(seq, h)


class ShardedView:
    """`EvictionView` over a cache's stores and index (built by `ShardedKVCache`)."""

    def __init__(self, stores: list[PagedStore], index: CacheIndex, dims: Dims, *,
                 group: Group, rank: int, world: int, device: torch.device,
                 action: Callable[[], EvictionAction]) -> None:
        self.stores, self.index, self.dims = stores, index, dims
        self.group, self.rank, self.world, self.device = group, rank, world, device
        self._action = action  # asked at each keep: the policy's action may be swapped

    def wire(self) -> torch.device:
        """Where small control tensors travel (NCCL: the GPU; gloo: the CPU)."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    # ------------------------------------------------------------ replicated counts
    def next_position(self, seq: int = 0, layer: int = 0) -> int:
        return self.index.seen[layer][seq]

    def head_counts_of(self, seq: int = 0, layer: int = 0) -> list[list[int]]:
        return [list(r) for r in self.index.head_counts[layer][seq]]

    def rank_counts(self, seq: int = 0, layer: int = 0) -> list[int]:
        return self.index.counts(layer, seq)

    def refresh(self, layer: int, seq: int) -> None:
        self.index.refresh(layer, seq, self.stores[layer], self.group, self.wire())

    # ------------------------------------------------------------ this rank's entries
    def entries(self, layer: int, seq: int) -> HeadEntries:
        st = self.stores[layer]
        at = [_where(st, seq, h) for h in range(st.kv_heads)]
        return HeadEntries(keys=[st.k[h, s] for h, s in enumerate(at)],
                           values=[st.v[h, s] for h, s in enumerate(at)],
                           positions=[st.pos[h, s] for h, s in enumerate(at)],
                           scores=[st.score[h, s].clone() for h, s in enumerate(at)])

    def set_scores(self, layer: int, seq: int, head: int, scores: Tensor) -> None:
        st = self.stores[layer]
        st.own(seq)  # copy on write: a forked sequence's scores are its own
        st.score[head, _where(st, seq, head)] = scores.to(st.score.device)

    # ------------------------------------------------------------ changes
    def keep(self, layer: int, seq: int, masks: list[Tensor], scores: list[Tensor]) -> None:
        st, action = self.stores[layer], self._action()
        # a forked sequence's survivors go to fresh pages: a rank short of them must not
        # raise alone (the others would wait in the next collective)
        short = st.keep_short(seq, masks)
        agree("evict (room)", self.group, None, **{"pages short": short},
              explain={"pages short": "KV cache capacity exceeded on some rank(s): pages "
                                      "each lacks for the kept entries of a forked sequence"})
        if short:
            raise ValueError(f"KV cache capacity exceeded: layer {layer}, sequence {seq} "
                             f"needs {short} more page(s) on rank {self.rank} for the entries "
                             f"it keeps (its pages were shared with another sequence)")
        for h, mask in enumerate(masks):
            drop = ~mask
            if bool(drop.any()):
                idx = st.head_slots(seq, h)[drop.to(st.pos.device)]
                action.demote(layer, seq, h, st.pos[h, idx].clone(), st.k[h, idx].clone(),
                              st.v[h, idx].clone(), scores[h][drop].clone())
        st.keep(seq, masks)
        self.refresh(layer, seq)

    def move(self, layer: int, seq: int, src: int, dst: int, keep: int,
             n: list[int]) -> None:
        if self.rank not in (src, dst):
            return
        st, d = self.stores[layer], self.dims
        comm = RingComm(self.group, "rebalance", None, self.device, op="cache rebalance")
        if self.rank == src:
            idx = [st.head_slots(seq, h)[keep:] for h in range(d.kv_heads)]
            bufs = [torch.cat([t[h, i] for h, i in enumerate(idx)]).contiguous()
                    for t in (st.k, st.v, st.pos, st.score)]
            comm.wait(comm.p2p(0, bufs, dst - src, [], 0))
            st.keep(seq, [torch.arange(hl, device=st.pos.device) < keep
                          for hl in st.hlens[seq]])
            return
        tot, dev = sum(n), st.k.device
        bufs = [torch.empty(tot, d.head_dim, dtype=st.k.dtype, device=dev),
                torch.empty(tot, d.head_dim, dtype=st.v.dtype, device=dev),
                torch.empty(tot, dtype=torch.int64, device=dev),
                torch.empty(tot, dtype=torch.float32, device=dev)]
        comm.wait(comm.p2p(0, [], 0, bufs, src - dst))
        st.append_heads(seq, *(list(b.split(n)) for b in bufs))
