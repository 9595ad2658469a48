"""The eviction coordinator of a `ShardedKVCache`: one global budget across every rank.

Per compression of (layer, seq): score this rank's tokens (`scorers`), mark the protected
ones (+inf), select the global top-k per KV head (or per layer, or AdaKV across heads) with
`grouped_topk_mask` (all-reduced histograms, never the scores themselves), hand the evicted
entries to the policy's action, compact the pages, and refresh the replicated per-rank
per-head counts with one small gather. Everything that decides whether a collective runs
is computed from replicated state, so every rank takes the same collectives.

Collectives per compression: 1 gather of the observation window (scorers that use it), 1
gather of normalisers (ExpectedAttention), 5 (+ tie rounds) per top-k stage (2 stages for
adaptive allocation), 1 gather of the new counts; rebalancing adds point-to-point moves.

The observation window: every rank keeps the last `observe` queries (with their global lse)
of the tokens it stores; a compression gathers them and keeps the `observe` latest overall.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..agree import agree
from ..comm import gather_rows
from .budget import EvictionPolicy
from .scorers import ScoreContext, Window
from .topk import grouped_topk_mask


def _take(t: Tensor, h: int, slots: Tensor) -> Tensor:
    """t[h, slots]: a view when the slots are one contiguous range (no copy of K/V)."""
    n = slots.numel()
    if n and bool((slots.diff() == 1).all()):
        return t[h, int(slots[0]):int(slots[0]) + n]
    return t[h, slots]


@dataclass
class EvictionRecord:
    """What one compression (or rebalance) did, identical on every rank."""
    layer: int
    seq: int
    seen: int
    budget: int
    before: list[int]
    """Per rank: slots in use (max over heads) before."""
    after: list[int]
    kept_per_head: list[int]
    """Per KV head: tokens kept over all ranks."""
    evicted: int
    """(head, token) entries evicted over all ranks."""
    moved: int = 0
    """Tokens (slots) moved between ranks by rebalancing."""
    seconds: float = 0.0


@dataclass
class _Obs:
    q: Tensor | None = None  # [m, Hq, D]
    lse: Tensor | None = None  # [m, Hq]
    pos: Tensor | None = None  # [m]


class Coordinator:
    """Eviction state of one cache on this rank (created by `ShardedKVCache`)."""

    def __init__(self, cache: Any, policy: EvictionPolicy) -> None:
        self.cache, self.policy = cache, policy
        c = cache.config
        self._obs = [[_Obs() for _ in range(c.max_seqs)] for _ in range(c.num_layers)]
        self.folded = [[-1] * c.max_seqs for _ in range(c.num_layers)]
        # prompt queries observed since the last fold (replicated: prefill is collective)
        self.pending = [[False] * c.max_seqs for _ in range(c.num_layers)]
        self.scale = [[1.0] * c.max_seqs for _ in range(c.num_layers)]
        self.steps = [0] * c.num_layers
        self.records: list[EvictionRecord] = []

    def reset(self, seq: int) -> None:
        for layer in range(len(self._obs)):
            self._obs[layer][seq] = _Obs()
            self.folded[layer][seq] = -1
            self.pending[layer][seq] = False

    # ------------------------------------------------------------ observation window
    def observe(self, layer: int, seq: int, q: Tensor, lse: Tensor, pos: Tensor,
                scale: float, prompt: bool = True) -> None:
        """Remember queries of tokens this rank stores: q [n, Hq, D], lse [n, Hq], pos [n].
        Every rank calls it for a prompt chunk (even with n = 0)."""
        o, w = self._obs[layer][seq], self.policy.observe
        if prompt:
            self.pending[layer][seq] = True
        self.scale[layer][seq] = scale
        if q.shape[0] == 0:
            return
        q, lse, pos = q.detach().double(), lse.detach().double(), pos.to(torch.int64)
        if o.q is not None:
            q, lse, pos = torch.cat([o.q, q]), torch.cat([o.lse, lse]), torch.cat([o.pos, pos])
        if pos.numel() > w:
            idx = torch.argsort(pos)[-w:]
            q, lse, pos = q[idx], lse[idx], pos[idx]
        o.q, o.lse, o.pos = q, lse, pos

    def window(self, layer: int, seq: int) -> Window:
        """The `observe` latest queries over all ranks (one gather), oldest first."""
        cache, w = self.cache, self.policy.observe
        c = cache.config
        width = c.q_heads * c.head_dim + c.q_heads + 1
        mine = torch.zeros(w, width, dtype=torch.float64)
        mine[:, -1] = -1  # empty rows: position -1
        o = self._obs[layer][seq]
        if o.q is not None:
            m = o.q.shape[0]
            mine[:m, :-1] = torch.cat([o.q.flatten(1).cpu(), o.lse.cpu()], 1)
            mine[:m, -1] = o.pos.double().cpu()
        rows = (gather_rows(mine.flatten().to(self._wire()), cache.group, cache.world)
                .cpu() if cache.world > 1 else mine[None])
        rows = rows.reshape(-1, width)
        rows = rows[rows[:, -1] >= 0]
        rows = rows[torch.argsort(rows[:, -1])][-w:]
        dev = cache.device
        hd = c.q_heads * c.head_dim
        return Window(rows[:, :hd].reshape(-1, c.q_heads, c.head_dim).to(dev),
                      rows[:, hd:-1].to(dev), rows[:, -1].to(torch.int64).to(dev))

    def _wire(self) -> torch.device:
        dev = self.cache.device
        return dev if dev.type == "cuda" else torch.device("cpu")

    # ------------------------------------------------------------ decode hook
    def before_decode(self, layer: int, seq: int) -> None:
        """Fold the prompt's window into the state before this step's query (A2SF's
        forgetting needs queries in time order). Collective when something is pending."""
        if self.policy.scorer.decay is not None and self.pending[layer][seq]:
            self.fold(layer, seq)

    def fold(self, layer: int, seq: int, ctx: ScoreContext | None = None) -> None:
        """Fold the window's queries not yet in the state (the prompt's), oldest first."""
        dec = self.policy.scorer.decay
        assert dec is not None
        store = self.cache.stores[layer]
        slots = [store.head_slots(seq, h) for h in range(store.kv_heads)]
        if ctx is None:
            ctx = self.context(layer, seq, slots, True)
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
            store.score[h, slots[h]] = ctx.state[h]
        self.folded[layer][seq] = int(sub.pos.max())

    def context(self, layer: int, seq: int, slots: list[Tensor], window: bool
                ) -> ScoreContext:
        """What the scorers see of (layer, seq) on this rank (gathers the window if asked)."""
        cache, store = self.cache, self.cache.stores[layer]
        c = cache.config
        ctx = ScoreContext(keys=[_take(store.k, h, s) for h, s in enumerate(slots)],
                           values=[_take(store.v, h, s) for h, s in enumerate(slots)],
                           positions=[_take(store.pos, h, s) for h, s in enumerate(slots)],
                           state=[store.score[h, s] for h, s in enumerate(slots)],
                           window=None, scale=self.scale[layer][seq],
                           groups=c.q_heads // c.kv_heads, group=cache.group,
                           world=cache.world)
        if window:
            ctx.window = self.window(layer, seq)
        return ctx

    def after_decode(self, layer: int, seq: int, logits: list[Tensor] | None, lse: Tensor,
                     l_new: Tensor, q: Tensor, pos: int, owner: int, scale: float) -> Tensor:
        """Fold one decode query into the state; returns the new token's initial scores
        [1, Hkv]. logits: per KV head [G, n_h] kept by the decode pass; lse [Hq]: the
        global lse including the new token, whose own score is l_new [Hq]."""
        c, dec = self.cache.config, self.policy.scorer.decay
        g = c.q_heads // c.kv_heads
        init = torch.zeros(1, c.kv_heads, dtype=torch.float32, device=lse.device)
        if dec is not None and logits is not None:
            store = self.cache.stores[layer]
            for h, s in enumerate(logits):
                mass = torch.exp(s - lse[h * g:(h + 1) * g, None]).mean(0).to(torch.float32)
                idx = store.head_slots(seq, h)
                store.score[h, idx] = dec * store.score[h, idx] + mass.to(store.score.device)
            init[0] = torch.exp(l_new - lse).reshape(c.kv_heads, g).mean(1)
            self.folded[layer][seq] = pos
        if owner == self.cache.rank:
            self.observe(layer, seq, q[None], lse[None], torch.tensor([pos]), scale, False)
        return init

    def decode_step_done(self, layer: int) -> list[EvictionRecord]:
        self.steps[layer] += 1
        every = self.policy.decode_every
        if every and self.steps[layer] % every == 0:
            return [r for s in range(self.cache.config.max_seqs) for r in self.enforce(layer, s)]
        return []

    # ------------------------------------------------------------ compression
    def enforce(self, layer: int, seq: int) -> list[EvictionRecord]:
        """The hook after a layer's prefill chunk or decode step. Layers run in order, so
        under allocation "global" (one pool over every layer) the last layer's call
        compresses them all together and the others' do nothing."""
        if self.policy.allocation != "global":
            rec = self.compress(layer, seq)
            return [] if rec is None else [rec]
        if layer == self.cache.config.num_layers - 1:
            return self.compress_layers(seq)
        return []

    def _totals(self, layer: int, seq: int) -> list[int]:
        hc = self.cache.head_counts[layer][seq]
        return [sum(row[h] for row in hc) for h in range(self.cache.config.kv_heads)]

    def over_budget(self, layer: int, seq: int) -> bool:
        cache, pol = self.cache, self.policy
        b = pol.tokens(cache.seen[layer][seq])
        totals = self._totals(layer, seq)
        if pol.allocation == "adaptive":
            return sum(totals) > b * len(totals)
        return max(totals) > b

    def compress_cache(self, layer: int | None, seq: int | None) -> list[EvictionRecord]:
        """`ShardedKVCache.compress`: the arguments checked on every rank together, then
        each (layer, seq) over budget compressed (all layers at once under "global"), then
        the evicted entries demoted to the tiers."""
        cache, error = self.cache, None
        try:
            layers = (range(cache.config.num_layers) if layer is None
                      else [cache._layer(layer)])
            seqs = range(cache.config.max_seqs) if seq is None else [cache._seq(seq)]
            if self.policy.allocation == "global" and layer is not None:
                raise ValueError(f"allocation='global' pools the budget over every layer: "
                                 f"compress them together (layer=None), got layer={layer!r}")
        except (TypeError, ValueError) as e:
            error, layers, seqs = e, [], []
        agree("compress", cache.group, error, device=cache.device,
              layer=layer if isinstance(layer, int) else repr(layer),
              seq=seq if isinstance(seq, int) else repr(seq))
        if self.policy.allocation == "global":
            out = [r for s in seqs for r in self.compress_layers(s)]
        else:
            out = [r for lay in layers for s in seqs
                   if (r := self.compress(lay, s)) is not None]
        if cache.tiers is not None:  # demote now; a full tier store raises on every rank
            try:
                for lay in layers:
                    for s in seqs:
                        cache.tiers.flush(lay, s)
            except (ValueError, OSError) as e:
                error = e
            agree("compress (demotion)", cache.group, error, device=cache.device)
        return out

    def compress(self, layer: int, seq: int) -> EvictionRecord | None:
        """Enforce the budget on (layer, seq) if it is exceeded (collective). Not for
        allocation "global", whose layers share one pool (`compress_layers`)."""
        if self.policy.allocation == "global":
            raise ValueError("allocation='global' pools the budget over every layer: "
                             "compress all layers together (compress_layers)")
        if not self.over_budget(layer, seq):
            return None
        t0 = time.perf_counter()
        seen = self.cache.seen[layer][seq]
        budget = self.policy.tokens(seen)
        before = list(self.cache.counts[layer][seq])
        slots, positions, scores = self._scored(layer, seq)
        masks = self._select(scores, positions, seen, budget)
        return self._apply(layer, seq, slots, scores, masks, budget, before, t0)

    def compress_layers(self, seq: int) -> list[EvictionRecord]:
        """Allocation "global": keep the best sum-of-budgets x Hkv (layer, head, token)
        entries of the whole cache, each (layer, head) first guaranteed its floor: budget
        moves to the layers and heads whose attention is spread out (cross-layer AdaKV).
        Collective; the same 2 top-k stages as adaptive allocation, for every layer at once."""
        cache, pol = self.cache, self.policy
        nl, hkv = cache.config.num_layers, cache.config.kv_heads
        budgets = [pol.tokens(cache.seen[layer][seq]) for layer in range(nl)]
        if sum(sum(self._totals(layer, seq)) for layer in range(nl)) <= sum(budgets) * hkv:
            return []
        t0 = time.perf_counter()
        befores = [list(cache.counts[layer][seq]) for layer in range(nl)]
        scored = [self._scored(layer, seq) for layer in range(nl)]
        flat = torch.cat([s for _, _, scores in scored for s in scores])
        pos = torch.cat([p for _, positions, _ in scored for p in positions])
        gid = torch.cat([torch.full_like(p, layer * hkv + h) for layer, (_, positions, _)
                         in enumerate(scored) for h, p in enumerate(positions)])
        floors = [pol.head_floor(cache.seen[layer][seq]) for layer in range(nl)
                  for _ in range(hkv)]
        keep = self._pool(flat, pos, gid, floors, sum(budgets) * hkv)
        parts = iter(keep.split([p.numel() for _, positions, _ in scored
                                 for p in positions]))
        spent = (time.perf_counter() - t0) / nl
        recs = []
        for layer, (slots, _, scores) in enumerate(scored):
            masks = [next(parts) for _ in range(hkv)]
            recs.append(self._apply(layer, seq, slots, scores, masks, budgets[layer],
                                    befores[layer], time.perf_counter() - spent))
        return recs

    def _scored(self, layer: int, seq: int) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """This rank's (slots, positions, float32 scores with the protected at +inf) per
        KV head of (layer, seq)."""
        cache, pol, scorer = self.cache, self.policy, self.policy.scorer
        store, seen = cache.stores[layer], cache.seen[layer][seq]
        slots = [store.head_slots(seq, h) for h in range(cache.config.kv_heads)]
        ctx = self.context(layer, seq, slots, scorer.needs_window or scorer.decay is not None)
        if scorer.needs_window and ctx.window is not None and ctx.window.pos.numel() == 0:
            raise ValueError(f"scorer {scorer.name!r} needs observed queries (prefill or "
                             f"decode through the cache first); none for layer {layer}, "
                             f"sequence {seq}")
        if scorer.decay is not None:
            self.fold(layer, seq, ctx)
        scores = [torch.nan_to_num(s.to(torch.float32), nan=float("-inf"))  # NaN: no info
                  for s in scorer.score(ctx)]
        protect = [(p < pol.sinks) | (p >= seen - pol.recent) for p in ctx.positions]
        scores = [torch.where(m, torch.full_like(s, float("inf")), s)
                  for s, m in zip(scores, protect)]
        return slots, ctx.positions, scores

    def _apply(self, layer: int, seq: int, slots: list[Tensor], scores: list[Tensor],
               masks: list[Tensor], budget: int, before: list[int], t0: float
               ) -> EvictionRecord:
        """Hand the evicted entries to the action, compact, recount, maybe rebalance."""
        cache, pol = self.cache, self.policy
        store = cache.stores[layer]
        for h in range(cache.config.kv_heads):
            drop = ~masks[h]
            if bool(drop.any()):
                idx = slots[h][drop]
                pol.action.demote(layer, seq, h, store.pos[h, idx].clone(),
                                  store.k[h, idx].clone(), store.v[h, idx].clone(),
                                  scores[h][drop].clone())
        store.keep(seq, masks)
        entries = sum(sum(r) for r in cache.head_counts[layer][seq])
        cache.refresh_counts(layer, seq)
        kept = self._totals(layer, seq)
        rec = EvictionRecord(layer, seq, cache.seen[layer][seq], budget, before,
                             list(cache.counts[layer][seq]), kept, entries - sum(kept),
                             seconds=time.perf_counter() - t0)
        if pol.rebalance:
            rec.moved = self.rebalance(layer, seq)
            rec.after = list(cache.counts[layer][seq])
        self.records.append(rec)
        return rec

    def _select(self, scores: list[Tensor], positions: list[Tensor], seen: int,
                budget: int) -> list[Tensor]:
        """Per head, the bool keep mask of this rank's tokens."""
        pol, cache = self.policy, self.cache
        hkv, grp = len(scores), cache.group
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
        grp = self.cache.group
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
        cache, factor = self.cache, self.policy.rebalance
        hc = [list(r) for r in cache.head_counts[layer][seq]]
        world, moved = cache.world, 0
        for _ in range(4 * world):
            loads = [max(r) for r in hc]
            heavy = max(range(world), key=lambda r: (loads[r], -r))
            light = min(range(world), key=lambda r: (loads[r], r))
            if loads[heavy] <= factor * sum(loads) / world or loads[heavy] - loads[light] < 2:
                break
            keep = loads[heavy] - (loads[heavy] - loads[light]) // 2
            n = [max(0, x - keep) for x in hc[heavy]]
            self._move(layer, seq, heavy, light, keep, n)
            hc[light] = [a + b for a, b in zip(hc[light], n)]
            hc[heavy] = [min(x, keep) for x in hc[heavy]]
            moved += max(n)
        if moved:
            cache.refresh_counts(layer, seq)
        return moved

    def _move(self, layer: int, seq: int, src: int, dst: int, keep: int, n: list[int]) -> None:
        cache = self.cache
        store, rank = cache.stores[layer], cache.rank
        c = cache.config
        if rank not in (src, dst):
            return
        g = cache.group if cache.group is not None else dist.group.WORLD
        peer = dist.get_global_rank(g, dst if rank == src else src)
        tot, d = sum(n), c.head_dim
        if rank == src:
            idx = [store.head_slots(seq, h)[keep:] for h in range(c.kv_heads)]
            bufs = [torch.cat([store.k[h, i] for h, i in enumerate(idx)]),
                    torch.cat([store.v[h, i] for h, i in enumerate(idx)]),
                    torch.cat([store.pos[h, i] for h, i in enumerate(idx)]),
                    torch.cat([store.score[h, i] for h, i in enumerate(idx)])]
            ops = [dist.P2POp(dist.isend, b.contiguous(), peer, g) for b in bufs]
        else:
            dev = store.k.device
            bufs = [torch.empty(tot, d, dtype=c.dtype, device=dev),
                    torch.empty(tot, d, dtype=c.dtype, device=dev),
                    torch.empty(tot, dtype=torch.int64, device=dev),
                    torch.empty(tot, dtype=torch.float32, device=dev)]
            ops = [dist.P2POp(dist.irecv, b, peer, g) for b in bufs]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        if rank == src:
            store.keep(seq, [torch.arange(hl, device=store.pos.device) < keep
                             for hl in store.hlens[seq]])
        else:
            parts = [list(b.split(n)) for b in bufs]
            store.append_heads(seq, *parts)

    # ------------------------------------------------------------ statistics
    def stats(self) -> dict[str, Any]:
        """Per layer: compressions, entries evicted, slots moved, latest per-rank counts."""
        out: dict[str, Any] = {}
        for layer in range(self.cache.config.num_layers):
            recs = [r for r in self.records if r.layer == layer]
            out[f"layer{layer}"] = {
                "compressions": len(recs), "evicted": sum(r.evicted for r in recs),
                "moved": sum(r.moved for r in recs), "seconds": sum(r.seconds for r in recs),
                "tokens_per_rank": [self.cache.rank_counts(s, layer)
                                    for s in range(self.cache.config.max_seqs)]}
        return out
