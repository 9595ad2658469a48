"""The observation window: the latest queries (with their global lse) of the tokens this
rank stores, per (layer, seq); a compression gathers every rank's and keeps the `size`
latest overall, the same on every rank (one gather)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..comm import gather_rows
from .scorers import Window
from .view import EvictionView


@dataclass
class _Obs:
    q: Tensor | None = None  # [m, Hq, D] fp64
    lse: Tensor | None = None  # [m, Hq] fp64
    pos: Tensor | None = None  # [m]


class Observations:
    """Per (layer, seq), this rank's latest `size` observed queries."""

    def __init__(self, num_layers: int, max_seqs: int, size: int) -> None:
        self.size = size
        self._obs = [[_Obs() for _ in range(max_seqs)] for _ in range(num_layers)]

    def reset(self, seq: int) -> None:
        for per_layer in self._obs:
            per_layer[seq] = _Obs()

    def fork(self, src: int, dst: int) -> None:
        """`dst` observes what `src` observed (its queries are shared history)."""
        for per_layer in self._obs:
            o = per_layer[src]
            per_layer[dst] = _Obs(o.q, o.lse, o.pos)  # never written in place: no copy

    def add(self, layer: int, seq: int, q: Tensor, lse: Tensor, pos: Tensor) -> None:
        """q [n, Hq, D], lse [n, Hq], pos [n]: queries of tokens this rank stores."""
        if q.shape[0] == 0:
            return
        o = self._obs[layer][seq]
        q, lse = q.detach().double(), lse.detach().double()
        pos = pos.to(q.device, torch.int64)  # with q, so selecting by position stays there
        if o.q is not None:
            q, lse, pos = torch.cat([o.q, q]), torch.cat([o.lse, lse]), torch.cat([o.pos, pos])
        if pos.numel() > self.size:
            idx = torch.argsort(pos)[-self.size:]
            q, lse, pos = q[idx], lse[idx], pos[idx]
        o.q, o.lse, o.pos = q, lse, pos

    def gather(self, view: EvictionView, layer: int, seq: int) -> Window:
        """The `size` latest queries over all ranks (collective), oldest first."""
        d, w = view.dims, self.size
        width = d.q_heads * d.head_dim + d.q_heads + 1
        mine = torch.zeros(w, width, dtype=torch.float64)
        mine[:, -1] = -1  # empty rows: position -1
        o = self._obs[layer][seq]
        if o.q is not None:
            m = o.q.shape[0]
            mine[:m, :-1] = torch.cat([o.q.flatten(1).cpu(), o.lse.cpu()], 1)
            mine[:m, -1] = o.pos.double().cpu()
        wire = view.device if view.device.type == "cuda" else torch.device("cpu")
        rows = (gather_rows(mine.flatten().to(wire), view.group, view.world).cpu()
                if view.world > 1 else mine[None])
        rows = rows.reshape(-1, width)
        rows = rows[rows[:, -1] >= 0]
        rows = rows[torch.argsort(rows[:, -1])][-w:]
        hd, dev = d.q_heads * d.head_dim, view.device
        return Window(rows[:, :hd].reshape(-1, d.q_heads, d.head_dim).to(dev),
                      rows[:, hd:-1].to(dev), rows[:, -1].to(torch.int64).to(dev))

    # ------------------------------------------------------------ checkpoints
    def export(self, layer: int) -> dict[str, Tensor]:
        out = {}
        for s, o in enumerate(self._obs[layer]):
            if o.q is not None:
                out.update({f"obs{s}_q": o.q, f"obs{s}_lse": o.lse, f"obs{s}_pos": o.pos})
        return out

    def restore(self, layer: int, tensors: dict[str, Tensor]) -> None:
        for s, o in enumerate(self._obs[layer]):
            if f"obs{s}_q" in tensors:
                o.q, o.lse, o.pos = (tensors[f"obs{s}_{n}"].clone() for n in ("q", "lse", "pos"))
