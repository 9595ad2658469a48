"""Context-reconstruction scores (question-agnostic, in the manner of KVzip).

A prefilled document is scored by how much the model needs each of its keys to repeat it:
the model reads a "repeat the context" prompt followed by the document again, chunk by
chunk, in a scratch sequence forked from the document's (its pages shared, so the
reconstruction's queries attend to the cached document and causally to the repeat so far);
each cached key's score is the most attention any reconstruction query gives it, over the
query heads of its KV head. No question is needed, so one compressed copy can serve any
number of questions.

The attention is exact under the global softmax: after each chunk of a layer, every rank's
reconstruction queries and their global lse are gathered (one all-gather), and each rank
scores its own keys of the document: p = exp(scale q.k - lse). The running maximum stays
here (the document's pages are shared with the scratch sequence while it runs: writing
scores into them would copy them); `end` writes it into the document's scores, which the
`ContextReconstruction` scorer returns, and the coordinator's usual top-k across ranks
keeps the best.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..comm import gather_rows
from ..partial import acc_dtype
from .view import EvictionView


class Reconstruction:
    """The running maxima of one reconstruction pass (per layer, per KV head, over this
    rank's keys of the target sequence in logical order)."""

    def __init__(self, view: EvictionView) -> None:
        self.view = view
        self.scratch: int | None = None
        self.target: int | None = None
        self.best: dict[int, list[Tensor]] = {}
        self.done: set[int] = set()
        """Target sequences whose scores came from a finished pass (replicated)."""

    def begin(self, target: int, scratch: int) -> None:
        """Start scoring `target` by what is prefilled into `scratch` (collective state)."""
        if target == scratch:
            raise ValueError(f"the scratch sequence must differ from the target ({target})")
        self.target, self.scratch, self.best = target, scratch, {}
        self.done.discard(target)

    def fold(self, layer: int, q: Tensor, lse: Tensor, scale: float) -> None:
        """After a reconstruction chunk of `layer` (every rank): this rank's queries q
        [n, Hq, D] (unscaled) and their global lse [n, Hq] join every rank's, and each
        key of the target on this rank keeps its largest attention probability."""
        v, d = self.view, self.view.dims
        width = d.q_heads * d.head_dim + d.q_heads
        rows = torch.cat([q.detach().double().flatten(1), lse.detach().double()], 1)
        if v.world > 1:  # ranks hold different numbers of the chunk's tokens: pad to most
            wire = v.device if v.device.type == "cuda" else torch.device("cpu")
            n = gather_rows(torch.tensor([float(rows.shape[0])], dtype=torch.float64,
                                         device=wire), v.group, v.world).flatten().long().cpu()
            pad = rows.new_zeros(int(n.max()) - rows.shape[0], width)
            got = gather_rows(torch.cat([rows, pad]).flatten().to(wire), v.group, v.world)
            got = got.reshape(v.world, -1, width)
            rows = torch.cat([got[r, :int(m)] for r, m in enumerate(n)]).to(q.device)
        qs = rows[:, :-d.q_heads].reshape(-1, d.q_heads, d.head_dim)
        lses = rows[:, -d.q_heads:]
        ent = v.entries(layer, self.target)
        g = d.q_heads // d.kv_heads
        best = self.best.setdefault(layer, [torch.zeros(k.shape[0], dtype=torch.float32,
                                                        device=k.device) for k in ent.keys])
        for h, k in enumerate(ent.keys):
            ad = acc_dtype(k.dtype)
            qh = qs[:, h * g:(h + 1) * g].to(ad) * scale  # [w, G, D]
            lh = lses[:, h * g:(h + 1) * g].to(ad)
            step = max(1, 2 ** 24 // max(1, qh.shape[0] * g))  # keys per pass: bounded memory
            for c in range(0, k.shape[0], step):
                s = torch.einsum("wgd,nd->wgn", qh, k[c:c + step].to(ad))
                top = torch.exp(s - lh.unsqueeze(-1)).amax((0, 1)).to(torch.float32)
                best[h][c:c + top.shape[0]] = torch.maximum(best[h][c:c + top.shape[0]], top)

    def end(self) -> None:
        """Write the maxima into the target's scores (its pages are no longer shared with
        the scratch sequence: reset it first) and mark it scored."""
        for layer, heads in self.best.items():
            for h, s in enumerate(heads):
                self.view.set_scores(layer, self.target, h, s)
        self.done.add(self.target)
        self.scratch, self.best = None, {}
