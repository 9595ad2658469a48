"""Global eviction over a sharded cache: scorers against float64 references, the kept set
against a single-process top-k of every rank's scores, budgets, protected tokens, decode and
prefill after eviction against full attention restricted to the kept tokens."""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from ringmem.cache import CacheConfig, PagedStore, ShardedKVCache
from ringmem.eviction import (
    A2SF,
    H2O,
    TOVA,
    EvictionPolicy,
    ExpectedAttention,
    KeyNorm,
    Scorer,
    SnapKV,
    StreamingLLM,
    grouped_topk_mask,
    make_scorer,
)
from ringmem.eviction.scorers import max_pool_positions
from ringmem.layouts import positions
from ringmem.testing import spawn

HQ, HKV, D, G = 4, 2, 8, 2
SCALE = 1 / math.sqrt(D)
INF = float("inf")


class Recording(Scorer):
    """Delegates to a scorer and records, per call, its positions and scores per head."""

    def __init__(self, inner: Scorer) -> None:
        self.inner, self.name = inner, inner.name
        self.decay, self.needs_window = inner.decay, inner.needs_window
        self.calls: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []

    def score(self, ctx):
        out = self.inner.score(ctx)
        self.calls.append(([p.clone() for p in ctx.positions], [s.clone() for s in out]))
        return out

    def signature(self):
        return self.inner.signature()


class Demotions:
    """An action that records what it is handed (a tier store would keep it)."""

    def __init__(self) -> None:
        self.got: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def demote(self, layer, seq, head, pos, k, v, score) -> None:
        self.got.append((head, pos, k, v))


def _gather(obj):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _held(cache: ShardedKVCache, layer: int = 0, seq: int = 0) -> list[list[set[int]]]:
    """[rank][head] -> positions held there."""
    st = cache.stores[layer]
    mine = [set(st.pos[h, st.head_slots(seq, h)].tolist()) for h in range(HKV)]
    return _gather(mine)


def _attend(q: torch.Tensor, present: list[list[int]], K, V) -> torch.Tensor:
    """q [Hq, D] against, per KV head, the keys at `present[h]` -> [Hq, D] (float64)."""
    out = torch.empty(HQ, D, dtype=torch.float64)
    for g in range(HQ):
        idx = torch.tensor(sorted(present[g // G]))
        s = SCALE * K[idx, g // G] @ q[g]
        out[g] = torch.softmax(s, 0) @ V[idx, g // G]
    return out


def _prefill(cache, Q, K, V, lo: int, hi: int) -> list[torch.Tensor]:
    """Prefill tokens [lo, hi) as one chunk (padded); returns (pos, out) of my rows."""
    world, rank = cache.world, cache.rank
    n = hi - lo
    padded = -(-n // world) * world
    parts = [cache.shard_chunk(torch.cat([t[None, lo:hi], torch.zeros(
        1, padded - n, *t.shape[1:], dtype=t.dtype)], 1)) for t in (Q, K, V)]
    out = cache.prefill_chunk(0, *parts, n_valid=n)
    pos = lo + positions(cache.config.layout, rank, world, padded // world)
    keep = pos < hi
    return [pos[keep], out[0, keep]]


def _mass_table(Q, K, upto: int) -> torch.Tensor:
    """M[i, h, j]: query i's probability on key j (causal, no eviction), mean over the
    query heads of KV head h (float64)."""
    s = torch.einsum("igd,jgd->igj", Q[:upto], K[:upto].repeat_interleave(G, 1)) * SCALE
    s = s.masked_fill(torch.ones(upto, upto, dtype=torch.bool).triu(1)[:, None], -INF)
    return torch.softmax(s, -1).reshape(upto, HKV, G, upto).mean(2)


def _reference_scores(name: str, Q, K, V, n_prompt: int, T: int, observe: int,
                      held: list[set[int]]) -> list[dict[int, float]]:
    """Per head {position: score} for the tokens this rank holds (float64 references)."""
    M = _mass_table(Q, K, T)
    win = list(range(T - observe, T))
    folded = list(range(n_prompt - observe, T))  # prompt window, then every decode query
    out = []
    for h in range(HKV):
        js = sorted(held[h])
        if name == "h2o":
            sc = M[folded, h].sum(0)
        elif name == "a2sf":
            w = torch.tensor([0.9 ** (T - 1 - i) for i in folded], dtype=torch.float64)
            sc = (M[folded, h] * w[:, None]).sum(0)
        elif name == "tova":
            sc = M[T - 1, h]
        elif name == "snapkv":
            m = M[win, h].mean(0)
            sc = torch.tensor([max(float(m[j2]) for j2 in js if abs(j2 - j) <= 3)
                               if j in held[h] else 0.0 for j in range(T)])
        elif name == "keynorm":
            sc = -K[:T, h].norm(dim=-1)
        elif name == "streaming":
            sc = torch.arange(T, dtype=torch.float64)
        else:  # expected attention: Gaussian model of the window's queries
            qw = Q[win]
            mu = qw.mean(0)
            dev = qw - mu
            cov = torch.einsum("whd,whe->hde", dev, dev) / (len(win) - 1)
            p = []
            for g in range(h * G, (h + 1) * G):
                a = SCALE * K[:T, h] @ mu[g] + SCALE ** 2 / 2 * torch.einsum(
                    "nd,de,ne->n", K[:T, h], cov[g], K[:T, h])
                p.append(torch.softmax(a, 0))
            sc = torch.stack(p).mean(0) * V[:T, h].norm(dim=-1)
        out.append({j: float(sc[j]) for j in js})
    return out


def _expected_keep(rows, pol: EvictionPolicy, seen: int) -> list[set[int]]:
    """Single-process selection over every rank's (head, pos, score): per head kept sets."""
    b = pol.tokens(seen)
    items = []  # (head, pos, float32 score with protection)
    for pos_h, sc_h in rows:
        for h in range(HKV):
            for p, s in zip(pos_h[h].tolist(), sc_h[h].tolist()):
                prot = p < pol.sinks or p >= seen - pol.recent
                items.append((h, p, INF if prot else s))
    keep: list[set[int]] = [set() for _ in range(HKV)]
    if pol.granularity == "layer":  # mean over heads in float32, like the coordinator
        per = {}
        for h, p, s in items:
            per.setdefault(p, [0.0] * HKV)[h] = s
        mean = {p: float(torch.tensor(v, dtype=torch.float32).mean()) for p, v in per.items()}
        top = sorted(mean, key=lambda p: (-mean[p], p))[:b]
        return [set(top) for _ in range(HKV)]
    by_head = [sorted([(s, p) for hh, p, s in items if hh == h], key=lambda x: (-x[0], x[1]))
               for h in range(HKV)]
    if pol.allocation == "uniform":
        return [{p for _, p in by_head[h][:b]} for h in range(HKV)]
    f = pol.head_floor(seen)
    floor = {(h, p) for h in range(HKV) for _, p in by_head[h][:f]}
    flat = [(INF if (h, p) in floor else s, p * HKV + h, h, p) for h, p, s in items]
    for _, _, h, p in sorted(flat, key=lambda x: (-x[0], x[1]))[:HKV * b]:
        keep[h].add(p)
    return keep


CONFIGS = [dict(), dict(allocation="adaptive", floor=0.3), dict(granularity="layer")]
SCORERS = ["streaming", "keynorm", "h2o", "a2sf", "tova", "snapkv", "expected"]


def _make(name: str) -> Scorer:
    return A2SF(0.9) if name == "a2sf" else make_scorer(name)


def _one_policy(rank: int, world: int, name: str, conf: dict, seed: int) -> list[str]:
    fails: list[str] = []
    n_prompt, n_dec, observe, budget = 29, 3, 6, 12
    T = n_prompt + n_dec
    g = torch.Generator().manual_seed(seed)
    Q, K, V = (torch.randn(T + 8, h, D, generator=g, dtype=torch.float64)
               for h in (HQ, HKV, HKV))
    rec, dem = Recording(_make(name)), Demotions()
    pol = EvictionPolicy(scorer=rec, budget=budget, sinks=2, recent=3, observe=observe,
                         action=dem, **conf)
    backend = {"keynorm": "torch", "streaming": "sdpa"}.get(name, "paged")  # decode paths
    cache = ShardedKVCache(CacheConfig(num_layers=1, q_heads=HQ, kv_heads=HKV, head_dim=D,
                                       capacity=40, page_size=4, dtype=torch.float64,
                                       decode_backend=backend), eviction=pol)
    for lo in range(0, n_prompt, 10):
        _prefill(cache, Q, K, V, lo, min(n_prompt, lo + 10))
    for t in range(n_prompt, T):
        cache.decode(0, Q[None, t:t + 1], K[None, t:t + 1], V[None, t:t + 1])
    before = _held(cache)
    recs = cache.compress(0, 0)
    tag = f"{name} {conf} world {world} rank {rank}"
    if len(recs) != 1 or len(rec.calls) != 1:
        return [f"{tag}: expected one compression, got {len(recs)} records"]
    # 1. the scorer's values against an independent float64 reference
    pos_h, sc_h = rec.calls[0]
    ref = _reference_scores(name, Q, K, V, n_prompt, T, observe, before[rank])
    for h in range(HKV):
        got = dict(zip(pos_h[h].tolist(), sc_h[h].double().tolist()))
        if set(got) != set(ref[h]):
            fails.append(f"{tag}: head {h} scored positions {sorted(got)}")
            continue
        err = max(abs(got[j] - ref[h][j]) / (abs(ref[h][j]) + 1e-6) for j in got)
        if err > 1e-5:
            fails.append(f"{tag}: head {h} scores rel err {err:.2e}")
    # 2. the kept set is the single-process top-k of every rank's scores
    after = _held(cache)
    want = _expected_keep(_gather((pos_h, sc_h)), pol, T)
    for h in range(HKV):
        got = set().union(*(a[h] for a in after))
        if got != want[h]:
            fails.append(f"{tag}: head {h} kept {sorted(got ^ want[h])} differ")
        for r in range(world):
            if not after[r][h] <= before[r][h]:
                fails.append(f"{tag}: rank {r} head {h} gained tokens")
    # 3. budgets, protected tokens, demoted entries
    totals = [sum(len(a[h]) for a in after) for h in range(HKV)]
    if pol.allocation == "adaptive":
        ok = sum(totals) == HKV * budget and min(totals) >= pol.head_floor(T)
    else:
        ok = totals == [budget] * HKV
    if not ok or recs[0].kept_per_head != totals:
        fails.append(f"{tag}: kept per head {totals} (record {recs[0].kept_per_head})")
    prot = {0, 1, T - 3, T - 2, T - 1}
    for h in range(HKV):
        if not prot <= set().union(*(a[h] for a in after)):
            fails.append(f"{tag}: head {h} lost a protected token")
        mine = [(p, k, v) for hh, ps, ks, vs in dem.got if hh == h
                for p, k, v in zip(ps.tolist(), ks, vs)]
        if {p for p, _, _ in mine} != before[rank][h] - after[rank][h] or any(
                not (torch.equal(k, K[p, h]) and torch.equal(v, V[p, h])) for p, k, v in mine):
            fails.append(f"{tag}: head {h} demoted entries are not the evicted ones")
    # 4. decode, then prefill, after eviction = full attention over the kept tokens
    present = [sorted(set().union(*(a[h] for a in after))) for h in range(HKV)]
    for t in range(T, T + 3):
        out = cache.decode(0, Q[None, t:t + 1], K[None, t:t + 1], V[None, t:t + 1])[0, 0]
        present = [p + [t] for p in present]
        err = (out - _attend(Q[t], present, K, V)).abs().max().item()
        if err > 1e-12:
            fails.append(f"{tag}: decode at {t} err {err:.2e}")
    pos, out = _prefill(cache, Q, K, V, T + 3, T + 8)
    for i, t in enumerate(pos.tolist()):
        err = (out[i] - _attend(Q[t], [p + list(range(T + 3, t + 1)) for p in present], K, V)
               ).abs().max().item()
        if err > 1e-12:
            fails.append(f"{tag}: prefill after eviction at {t} err {err:.2e}")
    return fails


def _grouped_cases(rank: int, world: int) -> list[str]:
    """grouped_topk_mask vs a per-group single-process top-k (ties, uneven shards)."""
    fails = []
    for seed, n, groups in [(1, 120, 3), (2, 60, 5)]:
        g = torch.Generator().manual_seed(seed)
        scores = torch.randint(-2, 3, (n,), generator=g).float()
        scores[torch.randperm(n, generator=g)[:4]] = INF
        gid = torch.randint(0, groups, (n,), generator=g)
        ids = torch.randperm(5 * n, generator=g)[:n]
        ks = torch.randint(0, n // groups + 3, (groups,), generator=g).tolist()
        ks[0] = 0
        ks[-1] = n  # >= the group's total
        cuts = sorted(torch.randperm(n - 1, generator=g)[:world - 1].add(1).tolist())
        b = [0] + cuts + [n]
        lo, hi = b[rank], b[rank + 1]
        keep = grouped_topk_mask(scores[lo:hi], ids[lo:hi], gid[lo:hi], ks)
        got = set(ids[lo:hi][keep].tolist())
        want = set()
        for grp in range(groups):
            idx = [i for i in range(n) if gid[i] == grp]
            idx.sort(key=lambda i: (-float(scores[i]), int(ids[i])))
            want |= {int(ids[i]) for i in idx[:ks[grp]]}
        if got != want & set(ids[lo:hi].tolist()):
            fails.append(f"grouped top-k seed {seed} rank {rank}")
    return fails


def _all_policies(rank: int, world: int, full: bool) -> None:
    fails = _grouped_cases(rank, world)
    for i, name in enumerate(SCORERS):
        confs = CONFIGS if full else [CONFIGS[i % 3]]
        for j, conf in enumerate(confs):
            fails += _one_policy(rank, world, name, conf, 100 * i + j + world)
    assert not fails, "\n".join(fails)


@pytest.mark.parametrize("world,full", [(1, True), (2, False), (3, False), (4, True)])
def test_every_scorer_kept_set_budget_and_attention_after_eviction(world: int,
                                                                   full: bool) -> None:
    spawn(_all_policies, world, full, timeout=240)


def _during_prefill_decode_and_rebalance(rank: int, world: int) -> None:
    """Compression after every prefill chunk and every 2 decode steps, recency scorer on a
    contiguous layout (kept tokens pile up on the last rank), rebalanced within 1.25x of
    the mean; after each step the outputs equal attention over the kept tokens."""
    budget, n_prompt = 10, 36
    g = torch.Generator().manual_seed(7)
    Q, K, V = (torch.randn(60, h, D, generator=g, dtype=torch.float64) for h in (HQ, HKV, HKV))
    pol = EvictionPolicy(scorer=StreamingLLM(), budget=budget, sinks=2, recent=2,
                         prefill="chunk", decode_every=2, rebalance=1.25)
    cache = ShardedKVCache(CacheConfig(num_layers=1, q_heads=HQ, kv_heads=HKV, head_dim=D,
                                       capacity=40, page_size=2, dtype=torch.float64,
                                       layout="contiguous"), eviction=pol)
    fails: list[str] = []
    present: list[list[int]] = [[] for _ in range(HKV)]
    for lo, hi in [(0, 24), (24, 36)]:
        pos, out = _prefill(cache, Q, K, V, lo, hi)
        for i, t in enumerate(pos.tolist()):
            want = _attend(Q[t], [p + list(range(lo, t + 1)) for p in present], K, V)
            if (out[i] - want).abs().max() > 1e-12:
                fails.append(f"prefill chunk {lo} position {t}")
        present = _check_after(cache, budget, hi, fails)
    moved = sum(r.moved for r in cache.eviction.records)
    if world > 1 and moved == 0:
        fails.append("no tokens were rebalanced")
    for t in range(n_prompt, n_prompt + 5):
        out = cache.decode(0, Q[None, t:t + 1], K[None, t:t + 1], V[None, t:t + 1])[0, 0]
        if (out - _attend(Q[t], [p + [t] for p in present], K, V)).abs().max() > 1e-12:
            fails.append(f"decode at {t}")
        present = ([sorted(s) for s in _check_after(cache, budget, t + 1, fails)]
                   if (t - n_prompt) % 2 == 1 else [p + [t] for p in present])
    stats = cache.eviction.stats()["layer0"]
    if stats["compressions"] != 4 or stats["tokens_per_rank"][0] != cache.rank_counts(0, 0):
        fails.append(f"stats {stats}")
    fails += _rebalance_split_heads(world)
    assert not fails, f"rank {rank}: " + "; ".join(fails)


def _rebalance_split_heads(world: int) -> list[str]:
    """Per-head eviction (key norm) with the protected window all on the last rank: the
    moved entries keep their heads, positions and values (decode stays exact)."""
    g = torch.Generator().manual_seed(11)
    Q, K, V = (torch.randn(31, h, D, generator=g, dtype=torch.float64) for h in (HQ, HKV, HKV))
    pol = EvictionPolicy(scorer=KeyNorm(), budget=8, sinks=0, recent=6, rebalance=1.25)
    cache = ShardedKVCache(CacheConfig(num_layers=1, q_heads=HQ, kv_heads=HKV, head_dim=D,
                                       capacity=32, page_size=2, dtype=torch.float64,
                                       layout="contiguous"), eviction=pol)
    _prefill(cache, Q, K, V, 0, 30)
    rec = cache.compress()[0]
    fails = []
    if world > 1 and (rec.moved == 0 or not cache.index.split[0][0]):
        fails.append(f"split heads: moved {rec.moved}, split {cache.index.split[0][0]}")
    held = _held(cache)
    present = []
    for h in range(HKV):
        sc = torch.where(torch.arange(30) >= 24, INF, -K[:30, h].to(torch.float32).norm(dim=-1))
        want = sorted(sorted(range(30), key=lambda j: (-float(sc[j]), j))[:8])
        got = sorted(set().union(*(a[h] for a in held)))
        if got != want or sum(len(a[h]) for a in held) != 8:
            fails.append(f"split heads: head {h} kept {got}, want {want}")
        present.append(got + [30])
    loads = cache.rank_counts(0, 0)
    if max(loads) > 1.25 * sum(loads) / world and max(loads) - min(loads) > 1:
        fails.append(f"split heads: unbalanced loads {loads}")
    out = cache.decode(0, Q[None, 30:31], K[None, 30:31], V[None, 30:31])[0, 0]
    if (out - _attend(Q[30], present, K, V)).abs().max() > 1e-12:
        fails.append("split heads: decode after rebalancing")
    return fails


def _check_after(cache, budget: int, seen: int, fails: list[str]) -> list[list[int]]:
    """After a compression: recency keeps sinks + the latest; loads within the factor."""
    held = _held(cache)
    want = sorted({0, 1} | set(range(seen - budget + 2, seen)))
    out = []
    for h in range(HKV):
        got = sorted(set().union(*(a[h] for a in held)))
        if got != want or sum(len(a[h]) for a in held) != budget:
            fails.append(f"seen {seen} head {h}: kept {got}")
        out.append(got)
    loads = cache.rank_counts(0, 0)
    if max(loads) > 1.25 * sum(loads) / len(loads) and max(loads) - min(loads) > 1:
        fails.append(f"seen {seen}: unbalanced loads {loads}")
    return out


@pytest.mark.parametrize("world", [1, 3])
def test_compress_during_prefill_and_decode_with_rebalancing(world: int) -> None:
    spawn(_during_prefill_decode_and_rebalance, world, timeout=120)


def _global_expected(calls, pol: EvictionPolicy, seen: int, nl: int) -> list[list[set[int]]]:
    """Single-process cross-layer selection: [layer][head] kept positions. calls: per rank,
    per layer, (positions, scores) per head."""
    items = []  # (layer, head, pos, float32 score with protection)
    for rank_calls in calls:
        for layer, (pos_h, sc_h) in enumerate(rank_calls):
            for h in range(HKV):
                for p, s in zip(pos_h[h].tolist(), sc_h[h].tolist()):
                    prot = p < pol.sinks or p >= seen - pol.recent
                    items.append((layer, h, p, INF if prot else s))
    f, b = pol.head_floor(seen), pol.tokens(seen)
    floor = set()
    for layer in range(nl):
        for h in range(HKV):
            mine = sorted([(s, p) for ll, hh, p, s in items if (ll, hh) == (layer, h)],
                          key=lambda x: (-x[0], x[1]))
            floor |= {(layer, h, p) for _, p in mine[:f]}
    flat = [(INF if (ll, h, p) in floor else s, p * nl * HKV + ll * HKV + h, ll, h, p)
            for ll, h, p, s in items]
    keep = [[set() for _ in range(HKV)] for _ in range(nl)]
    for _, _, ll, h, p in sorted(flat, key=lambda x: (-x[0], x[1]))[:nl * HKV * b]:
        keep[ll][h].add(p)
    return keep


def _global_allocation(rank: int, world: int) -> None:
    """allocation="global": one pool over every layer and KV head. Layers get queries of
    different sharpness, so the budget moves between layers; the kept set equals the
    single-process selection, totals are exact, and attention after eviction is exact."""
    nl, n, budget, fails = 3, 30, 9, []
    g = torch.Generator().manual_seed(5)
    sharp = [0.3, 1.0, 3.0]  # layer 0's attention is spread out, layer 2's focused
    Q = [sharp[i] * torch.randn(n + 4, HQ, D, generator=g, dtype=torch.float64)
         for i in range(nl)]
    K = [torch.randn(n + 4, HKV, D, generator=g, dtype=torch.float64) for _ in range(nl)]
    V = [torch.randn(n + 4, HKV, D, generator=g, dtype=torch.float64) for _ in range(nl)]
    rec = Recording(SnapKV(3))
    pol = EvictionPolicy(scorer=rec, budget=budget, sinks=1, recent=2, observe=5,
                         allocation="global", floor=0.7, decode_every=2)
    cache = ShardedKVCache(CacheConfig(num_layers=nl, q_heads=HQ, kv_heads=HKV, head_dim=D,
                                       capacity=40, page_size=4, dtype=torch.float64),
                           eviction=pol)
    for layer in range(nl):
        parts = [cache.shard_chunk(t[layer][None, :n]) for t in (Q, K, V)]
        cache.prefill_chunk(layer, *parts)
    with pytest.raises(ValueError, match="allocation='global' pools the budget"):
        cache.compress(layer=0)
    recs = cache.compress()
    calls = _gather(rec.calls)
    want = _global_expected(calls, pol, n, nl)
    kept = [[len(want[layer][h]) for h in range(HKV)] for layer in range(nl)]
    if len(recs) != nl or [r.kept_per_head for r in recs] != kept:
        fails.append(f"records {[r.kept_per_head for r in recs]} want {kept}")
    if sum(map(sum, kept)) != nl * HKV * budget or min(map(min, kept)) < pol.head_floor(n):
        fails.append(f"kept per (layer, head) {kept}")
    if max(map(max, kept)) <= budget:
        fails.append(f"the budget did not move between layers: {kept}")
    present = []
    for layer in range(nl):
        held = _held(cache, layer)
        present.append([sorted(set().union(*(a[h] for a in held))) for h in range(HKV)])
        for h in range(HKV):
            if set(present[layer][h]) != want[layer][h]:
                fails.append(f"layer {layer} head {h}: kept {present[layer][h]}")
            if not {0, n - 2, n - 1} <= want[layer][h]:
                fails.append(f"layer {layer} head {h} lost a protected token")
    # decode: exact over the kept tokens; every 2nd step compresses all layers together
    for t in (n, n + 1):
        for layer in range(nl):
            out = cache.decode(layer, Q[layer][None, t:t + 1], K[layer][None, t:t + 1],
                               V[layer][None, t:t + 1])[0, 0]
            present[layer] = [p + [t] for p in present[layer]]
            err = (out - _attend(Q[layer][t], present[layer], K[layer], V[layer])).abs().max()
            if err > 1e-12:
                fails.append(f"decode layer {layer} at {t}: err {err:.2e}")
    late = cache.eviction.records[nl:]
    if [r.layer for r in late] != list(range(nl)) or \
            sum(sum(r.kept_per_head) for r in late) != nl * HKV * budget:
        fails.append(f"decode-time compression: {[(r.layer, r.kept_per_head) for r in late]}")
    assert not fails, f"rank {rank}: " + "; ".join(fails)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_global_allocation_pools_the_budget_over_layers(world: int) -> None:
    spawn(_global_allocation, world, timeout=120)


def _distributed_errors(rank: int, world: int) -> None:
    cfg = CacheConfig(num_layers=2, q_heads=HQ, kv_heads=HKV, head_dim=D, capacity=16,
                      page_size=4, dtype=torch.float64)
    # policies that differ across ranks fail on every rank, in the constructor
    with pytest.raises(ValueError, match="arguments differ across ranks: eviction policy"):
        ShardedKVCache(cfg, eviction=EvictionPolicy(scorer=H2O(), budget=40 + rank))
    cache = ShardedKVCache(cfg, eviction=EvictionPolicy(scorer=SnapKV(), budget=8,
                                                        sinks=1, recent=1))
    with pytest.raises(ValueError, match="compress: arguments differ across ranks"):
        cache.compress(layer=rank)
    bad = 5 if rank == 0 else 0
    want = "layer must be an int in" if rank == 0 else "rank\\(s\\) \\[0\\] rejected"
    with pytest.raises(ValueError, match=want):
        cache.compress(layer=bad)
    # tokens added without any query: SnapKV has nothing to observe, on every rank alike
    kv = torch.randn(12, HKV, D, dtype=torch.float64)
    cache.extend_local(0, 0, kv, kv, torch.arange(12) * world + rank)
    cache.sync()
    assert cache.next_position(0, 0) == 12 * world and cache.seq_len(0, 0) == 12 * world
    with pytest.raises(ValueError, match="needs observed queries"):
        cache.compress(0, 0)
    plain = ShardedKVCache(cfg)
    with pytest.raises(ValueError, match="no eviction policy"):
        plain.compress()


def test_distributed_errors_raise_on_every_rank() -> None:
    spawn(_distributed_errors, 2, timeout=60)


def test_policy_and_scorer_errors() -> None:
    ok = dict(scorer=H2O(), budget=64)
    cases = [
        (TypeError, "scorer must be a ringmem.eviction Scorer", dict(scorer="h2o")),
        (TypeError, "budget must be an int or a float", dict(budget="10%")),
        (ValueError, "a ratio budget must be in \\(0, 1\\], got 1.5", dict(budget=1.5)),
        (ValueError, "budget=8 leaves no room", dict(budget=8, sinks=4, recent=8)),
        (ValueError, "granularity must be one of", dict(granularity="token")),
        (ValueError, "allocation must be one of", dict(allocation="pyramid")),
        (ValueError, "needs granularity='head'", dict(allocation="adaptive",
                                                      granularity="layer")),
        (ValueError, "needs granularity='head'", dict(allocation="global",
                                                      granularity="layer")),
        (ValueError, "floor must be a number in \\[0, 1\\]", dict(floor=2)),
        (ValueError, "observe must be an int >= 1", dict(observe=0)),
        (ValueError, "prefill must be one of", dict(prefill="during")),
        (ValueError, "decode_every must be an int >= 0", dict(decode_every=-1)),
        (TypeError, "action must have a demote", dict(action=object())),
        (ValueError, "rebalance must be 0 \\(off\\) or a factor > 1", dict(rebalance=0.5)),
    ]
    for exc, pattern, kw in cases:
        with pytest.raises(exc, match=pattern):
            EvictionPolicy(**{**ok, **kw})
    with pytest.raises(ValueError, match="forget must be a number in \\(0, 1\\)"):
        A2SF(1.0)
    with pytest.raises(ValueError, match="kernel must be a positive odd int"):
        SnapKV(4)
    with pytest.raises(TypeError, match="value_norm must be a bool"):
        ExpectedAttention(1)
    with pytest.raises(ValueError, match="scorer must be one of"):
        make_scorer("lru")
    with pytest.raises(TypeError, match="eviction must be an EvictionPolicy"):
        ShardedKVCache(CacheConfig(num_layers=1, q_heads=2, kv_heads=1, head_dim=4,
                                   capacity=8), eviction=H2O())
    with pytest.raises(ValueError, match="gid must lie in \\[0, 2\\)"):
        grouped_topk_mask(torch.zeros(3), torch.arange(3), torch.tensor([0, 1, 2]), [1, 1])
    # a ratio budget is a share of the context, never below the protected floor
    pol = EvictionPolicy(scorer=TOVA(), budget=0.1, sinks=2, recent=6)
    assert pol.tokens(1000) == 100 and pol.tokens(30) == 8
    assert isinstance(KeyNorm(), Scorer)


def test_max_pool_over_held_positions() -> None:
    g = torch.Generator().manual_seed(0)
    pos = torch.randperm(60, generator=g)[:25]
    x = torch.rand(25, generator=g)
    got = max_pool_positions(x, pos, 2)
    want = torch.tensor([max(float(x[j]) for j in range(25) if abs(int(pos[j]) - int(pos[i])) <= 2)
                         for i in range(25)])
    assert torch.equal(got, want.to(got.dtype))


def test_paged_store_per_head_keep_and_append() -> None:
    st = PagedStore(num_pages=4, page_size=3, kv_heads=2, head_dim=2, max_seqs=1,
                    dtype=torch.float64, device=torch.device("cpu"))
    k = torch.arange(7 * 2 * 2, dtype=torch.float64).reshape(7, 2, 2)
    st.append(0, k, -k, torch.arange(7))
    assert st.uniform(0) and st.lens == [7] and len(st.tables[0]) == 3
    st.keep(0, [torch.tensor([1, 0, 1, 0, 0, 0, 1], dtype=torch.bool),
                torch.tensor([0, 1, 1, 1, 0, 1, 0], dtype=torch.bool)])
    assert not st.uniform(0) and st.hlens[0] == [3, 4] and st.lens == [4]
    assert len(st.tables[0]) == 2 and st.free_pages == 2  # the third page went back
    with pytest.raises(ValueError, match="heads hold different tokens"):
        st.view(0)
    for h, want in enumerate(([0, 2, 6], [1, 2, 3, 5])):
        kk, vv, p = st.view(0, h)
        assert p.tolist() == want and torch.equal(kk[0, :, 0], k[want, h])
        assert torch.equal(vv[0, :, 0], -k[want, h])
    # appends go after each head's own tokens; per-head appends too
    st.append(0, k[:2], k[:2], torch.tensor([7, 8]))
    st.append_heads(0, [k[:1, 0], k[:3, 1]], [k[:1, 0], k[:3, 1]],
                    [torch.tensor([9]), torch.tensor([9, 10, 11])],
                    [torch.zeros(1), torch.zeros(3)])
    assert st.hlens[0] == [6, 9] and [st.view(0, h)[2].tolist() for h in range(2)] == [
        [0, 2, 6, 7, 8, 9], [1, 2, 3, 5, 7, 8, 9, 10, 11]]
    st.reset(0)
    assert st.free_pages == 4 and st.uniform(0) and (st.pos == -1).all()
