"""The eviction coordinator of a cache: one global budget across every rank.

It sees the cache only through `EvictionView` (per-head entries, replicated counts, the
group) and acts through it: keep masks go back through `view.keep`, rebalancing moves
through `view.move`. Per compression of (layer, seq): score this rank's tokens
(`scorers`), mark the protected ones (+inf), select the global top-k per KV head (or per
layer, or AdaKV across heads) with `grouped_topk_mask` (all-reduced histograms, never the
scores themselves), keep. Everything that decides whether a collective runs is computed
from replicated state, so every rank takes the same collectives.

Collectives per compression: 1 gather of the observation window (scorers that use it), 1
gather of normalisers (ExpectedAttention), 5 (+ tie rounds) per top-k stage (2 stages for
adaptive allocation), 1 gather of the new counts; rebalancing adds point-to-point moves.

Hooks the cache calls: `on_prefill` after each prompt chunk of a layer, `on_decode` once
per layer per decode step (it stores the new tokens through the cache's callback, so the
new token's initial score and any due compression land in order), `reset`.

Sliding-window layers (`Dims.windowed`, hybrid models such as Gemma 3) are never scored
or compressed: a window already keeps only its last `left` tokens. Their hooks only store
the token; budgets, and the "global" pool, cover the other layers (`Dims.evicted_layers`),
and "global" compresses after the last of those.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..partial import probs
from .budget import EvictionPolicy
from .reconstruct import Reconstruction
from .records import DecodeStep, EvictionRecord
from .scorers import ScoreContext, Window
from .topk import grouped_topk_mask
from .view import EvictionView
from .window import Observations


class Coordinator:
    """Eviction state of one cache on this rank (created by `ShardedKVCache`)."""

    def __init__(self, view: EvictionView, policy: EvictionPolicy) -> None:
        self.view, self.policy = view, policy
        d = view.dims
        self.obs = Observations(d.num_layers, d.max_seqs, policy.observe)
        self.folded = [[-1] * d.max_seqs for _ in range(d.num_layers)]
        # prompt queries observed since the last fold (replicated: prefill is collective)
        self.pending = [[False] * d.max_seqs for _ in range(d.num_layers)]
        self.scale = [[1.0] * d.max_seqs for _ in range(d.num_layers)]
        self.steps = [0] * d.num_layers
        self.records: list[EvictionRecord] = []
        self.recon = Reconstruction(view)  # context-reconstruction scores (KVzip-style)
        self.chunk_compression = True
        """Off: prefill chunks only observe (`hf_questions` turns it off for questions, so
        a document compressed while prefilled stays one shared copy)."""

    @property
    def wants_logits(self) -> bool:
        """Whether decode must keep each key's score (accumulating scorers)."""
        return self.policy.scorer.decay is not None

    def reset(self, seq: int) -> None:
        self.obs.reset(seq)
        self.recon.done.discard(seq)
        for layer in range(self.view.dims.num_layers):
            self.folded[layer][seq] = -1
            self.pending[layer][seq] = False

    def fork(self, src: int, dst: int) -> None:
        """`dst` starts from `src`'s state (`ShardedKVCache.fork`)."""
        self.obs.fork(src, dst)
        if src in self.recon.done:  # its scores are in the shared pages
            self.recon.done.add(dst)
        for per in (self.folded, self.pending, self.scale):
            for row in per:
                row[dst] = row[src]

    # ------------------------------------------------------------ hooks
    def on_prefill(self, layer: int, seq: int, q: Tensor, lse: Tensor, pos: Tensor,
                   scale: float) -> None:
        """After a prompt chunk of `layer` (every rank, even with n = 0 tokens here):
        remember the queries of the tokens this rank stored (q [n, Hq, D], lse [n, Hq],
        pos [n]), then compress if the policy compresses per chunk. Nothing for a
        windowed layer."""
        if self.view.dims.windowed(layer):  # its window evicts: nothing to observe
            return
        if seq == self.recon.scratch:  # a reconstruction chunk: it scores the document
            self.recon.fold(layer, q, lse, scale)
            return
        self.pending[layer][seq] = True
        self.scale[layer][seq] = scale
        self.obs.add(layer, seq, q, lse, pos)
        if self.policy.prefill == "chunk" and self.chunk_compression:
            self.enforce(layer, seq)

    def on_decode(self, layer: int, step: DecodeStep,
                  store: Callable[[int, Tensor | None], None]) -> list[EvictionRecord]:
        """Per sequence: fold the prompt's pending window (older queries first), fold this
        query's exact mass into the scores, `store(seq, initial scores [1, Hkv])` the new
        token; then compress every `decode_every` steps. A windowed layer's tokens are
        only stored (no scores, no compression)."""
        if self.view.dims.windowed(layer):
            for s in range(len(step.owners)):
                store(s, None)
            return []
        for s, owner in enumerate(step.owners):
            if self.wants_logits and self.pending[layer][s]:
                self.fold(layer, s)
            store(s, self._fold_query(layer, s, step, owner))
        self.steps[layer] += 1
        every = self.policy.decode_every
        if every and self.steps[layer] % every == 0:
            return [r for s in range(self.view.dims.max_seqs) for r in self.enforce(layer, s)]
        return []

    def _fold_query(self, layer: int, seq: int, step: DecodeStep, owner: int) -> Tensor:
        d, dec = self.view.dims, self.policy.scorer.decay
        g = d.q_heads // d.kv_heads
        lse, pos = step.lse[seq], step.positions[seq]
        init = torch.zeros(1, d.kv_heads, dtype=torch.float32, device=lse.device)
        logits = step.logits[seq]
        if dec is not None and logits is not None:
            ent = self.view.entries(layer, seq)
            for h, s in enumerate(logits):
                mass = probs(s, lse[h * g:(h + 1) * g]).mean(0).to(torch.float32)
                self.view.set_scores(layer, seq, h,
                                     dec * ent.scores[h] + mass.to(ent.scores[h].device))
            init[0] = torch.exp(step.l_new[seq] - lse).reshape(d.kv_heads, g).mean(1)
            self.folded[layer][seq] = pos
        if owner == self.view.rank:
            # a fill on the queries' device: no host->device copy on the step path
            self.obs.add(layer, seq, step.q[seq][None], lse[None],
                         torch.full((1,), pos, dtype=torch.int64, device=lse.device))
        return init

    # ------------------------------------------------------------ scoring state
    def fold(self, layer: int, seq: int, ctx: ScoreContext | None = None) -> None:
        """Fold the window's queries not yet in the state (the prompt's), oldest first."""
        dec = self.policy.scorer.decay
        assert dec is not None
        if ctx is None:
            ctx = self.context(layer, seq, True)
        win = ctx.window
        assert win is not None
        self.pending[layer][seq] = False
        new = win.pos > self.folded[layer][seq]
        if not bool(new.any()):
            return
        sub = Window(win.q[new], win.lse[new], win.pos[new])
        m = int(new.sum())
        wts = torch.tensor([dec ** (m - 1 - i) for i in range(m)], dtype=torch.float32,
                           device=sub.q.device)
        for h in range(len(ctx.keys)):
            mass = (ctx.query_mass(h, sub) * wts[:, None]).sum(0)
            ctx.state[h] = (dec ** m) * ctx.state[h] + mass.to(ctx.state[h].device)
            self.view.set_scores(layer, seq, h, ctx.state[h])
        self.folded[layer][seq] = int(sub.pos.max())

    def context(self, layer: int, seq: int, window: bool) -> ScoreContext:
        """What the scorers see of (layer, seq) on this rank (gathers the window if asked)."""
        v, d = self.view, self.view.dims
        ent = v.entries(layer, seq)
        return ScoreContext(keys=ent.keys, values=ent.values, positions=ent.positions,
                            state=ent.scores,
                            window=self.obs.gather(v, layer, seq) if window else None,
                            scale=self.scale[layer][seq], groups=d.q_heads // d.kv_heads,
                            group=v.group, world=v.world)

    # ------------------------------------------------------------ compression
    def enforce(self, layer: int, seq: int) -> list[EvictionRecord]:
        """The hook after a layer's prefill chunk or decode step. Layers run in order, so
        under allocation "global" (one pool over every non-windowed layer) the last such
        layer's call compresses them all together and the others' do nothing."""
        d = self.view.dims
        if d.windowed(layer):
            return []
        if self.policy.allocation != "global":
            rec = self.compress(layer, seq)
            return [] if rec is None else [rec]
        if layer == d.evicted_layers[-1]:
            return self.compress_layers(seq)
        return []

    def _totals(self, layer: int, seq: int) -> list[int]:
        return [sum(col) for col in zip(*self.view.head_counts_of(seq, layer))]

    def over_budget(self, layer: int, seq: int) -> bool:
        b = self.policy.tokens(self.view.next_position(seq, layer))
        totals = self._totals(layer, seq)
        if self.policy.allocation == "adaptive":
            return sum(totals) > b * len(totals)
        return max(totals) > b

    def compress_all(self, layers: list[int], seqs: list[int]) -> list[EvictionRecord]:
        """`ShardedKVCache.compress` after its argument check: each (layer, seq) over
        budget (every layer at once under "global"); windowed layers are skipped."""
        if self.policy.allocation == "global":
            return [r for s in seqs for r in self.compress_layers(s)]
        layers = [lay for lay in layers if not self.view.dims.windowed(lay)]
        return [r for lay in layers for s in seqs if (r := self.compress(lay, s)) is not None]

    def compress(self, layer: int, seq: int) -> EvictionRecord | None:
        """Enforce the budget on (layer, seq) if it is exceeded (collective). Not for
        allocation "global", whose layers share one pool (`compress_layers`)."""
        if self.policy.allocation == "global":
            raise ValueError("allocation='global' pools the budget over every layer: "
                             "compress all layers together (compress_layers)")
        if self.view.dims.windowed(layer):
            raise ValueError(f"layer {layer} has a sliding window: it keeps only its window "
                             f"and is never compressed")
        if not self.over_budget(layer, seq):
            return None
        t0 = time.perf_counter()
        seen = self.view.next_position(seq, layer)
        budget = self.policy.tokens(seen)
        before = self.view.rank_counts(seq, layer)
        positions, scores = self._scored(layer, seq)
        masks = self._select(scores, positions, seen, budget)
        return self._apply(layer, seq, scores, masks, budget, before, t0)

    def compress_layers(self, seq: int) -> list[EvictionRecord]:
        """Allocation "global": keep the best sum-of-budgets x Hkv (layer, head, token)
        entries of the whole cache (its non-windowed layers), each (layer, head) first
        guaranteed its floor: budget moves to the layers and heads whose attention is
        spread out (cross-layer AdaKV). Collective; the same 2 top-k stages as adaptive
        allocation, for every layer at once."""
        v, pol = self.view, self.policy
        layers, hkv = v.dims.evicted_layers, v.dims.kv_heads
        if not layers:
            return []
        seen = [v.next_position(seq, layer) for layer in layers]
        budgets = [pol.tokens(s) for s in seen]
        if sum(sum(self._totals(layer, seq)) for layer in layers) <= sum(budgets) * hkv:
            return []
        t0 = time.perf_counter()
        befores = [v.rank_counts(seq, layer) for layer in layers]
        scored = [self._scored(layer, seq) for layer in layers]
        flat = torch.cat([s for _, scores in scored for s in scores])
        pos = torch.cat([p for positions, _ in scored for p in positions])
        gid = torch.cat([torch.full_like(p, i * hkv + h) for i, (positions, _)
                         in enumerate(scored) for h, p in enumerate(positions)])
        floors = [pol.head_floor(s) for s in seen for _ in range(hkv)]
        keep = self._pool(flat, pos, gid, floors, sum(budgets) * hkv)
        parts = iter(keep.split([p.numel() for positions, _ in scored for p in positions]))
        spent = (time.perf_counter() - t0) / len(layers)
        recs = []
        for i, (layer, (_, scores)) in enumerate(zip(layers, scored)):
            masks = [next(parts) for _ in range(hkv)]
            recs.append(self._apply(layer, seq, scores, masks, budgets[i],
                                    befores[i], time.perf_counter() - spent))
        return recs

    def _scored(self, layer: int, seq: int) -> tuple[list[Tensor], list[Tensor]]:
        """This rank's (positions, float32 scores with the protected at +inf) per KV head
        of (layer, seq)."""
        pol, scorer = self.policy, self.policy.scorer
        seen = self.view.next_position(seq, layer)
        ctx = self.context(layer, seq, scorer.needs_window or scorer.decay is not None)
        if scorer.needs_window and ctx.window is not None and ctx.window.pos.numel() == 0:
            raise ValueError(f"scorer {scorer.name!r} needs observed queries (prefill or "
                             f"decode through the cache first); none for layer {layer}, "
                             f"sequence {seq}")
        if getattr(scorer, "reconstructs", False) and seq not in self.recon.done:
            raise ValueError(f"scorer {scorer.name!r} scores by context reconstruction: run "
                             f"hf_questions.reconstruct on sequence {seq} before compressing")
        if scorer.decay is not None:
            self.fold(layer, seq, ctx)
        scores = [torch.nan_to_num(s.to(torch.float32), nan=float("-inf"))  # NaN: no info
                  for s in scorer.score(ctx)]
        protect = [(p < pol.sinks) | (p >= seen - pol.recent) for p in ctx.positions]
        scores = [torch.where(m, torch.full_like(s, float("inf")), s)
                  for s, m in zip(scores, protect)]
        return ctx.positions, scores

    def _apply(self, layer: int, seq: int, scores: list[Tensor], masks: list[Tensor],
               budget: int, before: list[int], t0: float) -> EvictionRecord:
        """Keep through the view (evicted entries go to the cache's action), record,
        maybe rebalance."""
        v = self.view
        entries = sum(self._totals(layer, seq))
        v.keep(layer, seq, masks, scores)
        kept = self._totals(layer, seq)
        rec = EvictionRecord(layer, seq, v.next_position(seq, layer), budget, before,
                             v.rank_counts(seq, layer), kept, entries - sum(kept),
                             seconds=time.perf_counter() - t0)
        if self.policy.rebalance:
            rec.moved = self.rebalance(layer, seq)
            rec.after = v.rank_counts(seq, layer)
        self.records.append(rec)
        return rec

    def _select(self, scores: list[Tensor], positions: list[Tensor], seen: int,
                budget: int) -> list[Tensor]:
        """Per head, the bool keep mask of this rank's tokens."""
        pol, grp = self.policy, self.view.group
        hkv = len(scores)
        if pol.granularity == "layer":  # heads hold the same tokens: one score per token
            s = torch.stack(scores).mean(0)
            keep = grouped_topk_mask(s, positions[0], torch.zeros_like(positions[0]),
                                     [budget], group=grp)
            return [keep.clone() for _ in range(hkv)]
        flat = torch.cat(scores)
        gid = torch.cat([torch.full_like(p, h) for h, p in enumerate(positions)])
        pos = torch.cat(positions)
        if pol.allocation == "uniform":
            keep = grouped_topk_mask(flat, pos, gid, [budget] * hkv, group=grp)
        else:  # AdaKV: each head's floor first, then the best entries of the whole layer
            keep = self._pool(flat, pos, gid, [pol.head_floor(seen)] * hkv, budget * hkv)
        return list(keep.split([p.numel() for p in positions]))

    def _pool(self, flat: Tensor, pos: Tensor, gid: Tensor, floors: list[int], total: int
              ) -> Tensor:
        """AdaKV selection over G = len(floors) groups (heads, or (layer, head) pairs):
        each group's top floors[g] first, then the best `total` entries of all groups
        together (the floors count towards it). Exact across ranks; ties by position."""
        grp = self.view.group
        first = grouped_topk_mask(flat, pos, gid, floors, group=grp)
        flat = torch.where(first, torch.full_like(flat, float("inf")), flat)
        # one group over all: ids distinct per (position, group)
        return grouped_topk_mask(flat, pos * len(floors) + gid, torch.zeros_like(gid),
                                 [total], group=grp)

    # ------------------------------------------------------------ rebalancing
    def rebalance(self, layer: int, seq: int) -> int:
        """Move slots from the most to the least loaded rank while max load > factor x
        mean; returns the slots moved. The plan is computed from the replicated counts,
        so every rank follows it; each move is one batched point-to-point exchange."""
        v, factor = self.view, self.policy.rebalance
        hc = v.head_counts_of(seq, layer)
        world, moved = v.world, 0
        for _ in range(4 * world):
            loads = [max(r) for r in hc]
            heavy = max(range(world), key=lambda r: (loads[r], -r))
            light = min(range(world), key=lambda r: (loads[r], r))
            if loads[heavy] <= factor * sum(loads) / world or loads[heavy] - loads[light] < 2:
                break
            keep = loads[heavy] - (loads[heavy] - loads[light]) // 2
            n = [max(0, x - keep) for x in hc[heavy]]
            v.move(layer, seq, heavy, light, keep, n)
            hc[light] = [a + b for a, b in zip(hc[light], n)]
            hc[heavy] = [min(x, keep) for x in hc[heavy]]
            moved += max(n)
        if moved:
            v.refresh(layer, seq)
        return moved

    # ------------------------------------------------------------ statistics and state
    def stats(self) -> dict[str, Any]:
        """Per layer: whether it is windowed (then excluded from eviction: no
        compressions) and its window (-1: none), compressions, entries evicted, slots
        moved, latest per-rank counts."""
        out: dict[str, Any] = {}
        d = self.view.dims
        for layer in range(d.num_layers):
            recs = [r for r in self.records if r.layer == layer]
            out[f"layer{layer}"] = {
                "windowed": d.windowed(layer),
                "window": d.windows[layer] if d.windows else -1,
                "compressions": len(recs), "evicted": sum(r.evicted for r in recs),
                "moved": sum(r.moved for r in recs), "seconds": sum(r.seconds for r in recs),
                "tokens_per_rank": [self.view.rank_counts(s, layer)
                                    for s in range(d.max_seqs)]}
        return out

    def state(self) -> dict[str, Any]:
        """Counters for a checkpoint (the observation windows: `obs.export`)."""
        return {"folded": self.folded, "pending": self.pending, "scale": self.scale,
                "steps": self.steps}

    def load_state(self, state: dict[str, Any]) -> None:
        self.folded, self.pending = state["folded"], state["pending"]
        self.scale, self.steps = state["scale"], state["steps"]
