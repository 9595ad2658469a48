"""Importance scorers: one small class per policy, each mapping a rank's cached tokens to
per-(KV head, token) float32 scores; the coordinator keeps the globally highest.

Where attention mass comes from (exact global softmax probabilities, never a per-rank
renormalisation):

* decode: the decode pass keeps each key's scaled score s from the very matmul that computes
  the output (`ringmem.partial.attend(logits=...)`), and after the cross-rank merge the probability
  is exp(s - lse_global): no second read of K. Accumulating scorers (H2O, A2SF, TOVA) fold
  it into a per-(head, token) state at every decode step.
* prefill: the prefill kernels do not emit per-key mass, so the *observation window* (the
  last `observe` queries of the prompt, kept with their global lse by the cache) is scored
  against the local keys when a compression runs: w x n extra dot products per head, a
  small fraction of the prefill's own n^2/2 (it does read K once more, and only then).
  Accumulating scorers therefore see the window's queries of the prompt, not every prompt
  query (which would need per-key column sums from the prefill kernels).

A query head's mass on a key is averaged over the G query heads that share the KV head, so
every KV head's masses sum to at most 1 per query and budgets can be compared across heads
(adaptive allocation).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..arguments import check_flag
from ..comm import Group, gather_rows
from ..partial import acc_dtype, probs


@dataclass
class Window:
    """Observation queries, the same on every rank: q [w, Hq, D] (unscaled), their global
    lse [w, Hq] and positions [w], oldest first."""
    q: Tensor
    lse: Tensor
    pos: Tensor


@dataclass
class ScoreContext:
    """One (layer, seq) on this rank; per KV head h, its tokens in logical slot order."""
    keys: list[Tensor]
    """[n_h, D] per head (cache dtype)."""
    values: list[Tensor]
    positions: list[Tensor]
    """[n_h] int64 global positions."""
    state: list[Tensor]
    """[n_h] float32 accumulated mass (see `Scorer.decay`)."""
    window: Window | None
    scale: float
    groups: int
    """Query heads per KV head."""
    group: Group = None
    world: int = 1
    chunk: int = 65536
    _cache: dict = field(default_factory=dict)

    def query_mass(self, h: int, window: Window | None = None) -> Tensor:
        """[w, n_h] probability of each window query on each key of head h (mean over the
        G query heads), exact under the global softmax; 0 for keys after the query."""
        win = self.window if window is None else window
        if window is None and h in self._cache:  # the shared window: computed once per head
            return self._cache[h]
        k, pos = self.keys[h], self.positions[h]
        g = self.groups
        ad = acc_dtype(k.dtype)
        q = win.q[:, h * g:(h + 1) * g].to(ad) * self.scale  # [w, G, D]
        lse = win.lse[:, h * g:(h + 1) * g].to(ad)
        out = torch.zeros(q.shape[0], k.shape[0], dtype=torch.float32, device=k.device)
        for c in range(0, k.shape[0], self.chunk):
            kc = k[c:c + self.chunk].to(ad)
            s = torch.einsum("wgd,nd->wgn", q, kc)
            p = probs(s, lse)
            causal = pos[c:c + self.chunk].unsqueeze(0) <= win.pos.unsqueeze(1)  # [w, n]
            out[:, c:c + kc.shape[0]] = (p.mean(1) * causal).to(torch.float32)
        if window is None:
            self._cache[h] = out
        return out


class Scorer:
    """Base class. `decay` is None for scorers without state; else every observed query's
    mass m updates the state as state <- decay * state + m (H2O 1, A2SF < 1, TOVA 0)."""
    name = "scorer"
    decay: float | None = None
    needs_window = False

    def score(self, ctx: ScoreContext) -> list[Tensor]:
        """Per KV head, float32 [n_h] scores (higher = keep), no NaN."""
        raise NotImplementedError

    def signature(self) -> tuple:
        """Name and parameters, which must agree across ranks."""
        return (self.name,)


class StreamingLLM(Scorer):
    """Recency: keep the most recent tokens (with the policy's sinks: StreamingLLM).
    Scores are positions in float32, exact up to 2^24 tokens; beyond, ties among
    neighbouring positions resolve to the lower (older) one."""
    name = "streaming"

    def score(self, ctx: ScoreContext) -> list[Tensor]:
        return [p.to(torch.float32) for p in ctx.positions]


class KeyNorm(Scorer):
    """Keys with the smallest L2 norm matter most (Devoto et al., 2024): score = -|k|."""
    name = "keynorm"

    def score(self, ctx: ScoreContext) -> list[Tensor]:
        return [-k.to(torch.float32).norm(dim=-1) for k in ctx.keys]


class H2O(Scorer):
    """Heavy hitters: attention mass accumulated over every observed query."""
    name = "h2o"
    decay = 1.0

    def score(self, ctx: ScoreContext) -> list[Tensor]:
        return list(ctx.state)


class A2SF(Scorer):
    """Accumulated attention with a forgetting factor: older queries count less."""
    name = "a2sf"

    def __init__(self, forget: float = 0.95) -> None:
        if isinstance(forget, bool) or not isinstance(forget, (int, float)) or \
                not 0 < forget < 1:
            raise ValueError(f"forget must be a number in (0, 1), got {forget!r}")
        self.decay = float(forget)

    def score(self, ctx: ScoreContext) -> list[Tensor]:
        return list(ctx.state)

    def signature(self) -> tuple:
        return (self.name, float(self.decay))


class TOVA(Scorer):
    """The last query's attention (averaged over the KV head's query heads). TOVA as
    published averages over every head of the layer and keeps the same tokens in all of
    them: use it with `EvictionPolicy(granularity="layer")` (one noisy query: averaging
    over more heads is what makes it reliable, see benchmarks/eviction_quality.py)."""
    name = "tova"
    decay = 0.0

    def score(self, ctx: ScoreContext) -> list[Tensor]:
        return list(ctx.state)


class SnapKV(Scorer):
    """Mass of the observation window's queries, averaged, then max-pooled over positions.

    Pooling is over the neighbours (|position difference| <= kernel // 2) that this rank
    holds: exact global pooling under a contiguous split except at shard edges; under the
    `stripe` layout a rank holds no neighbour within the kernel when the world size exceeds
    kernel // 2, and pooling does nothing. (Exact pooling would need the neighbours' mass
    from other ranks, i.e. gathering every score under `stripe`.)

    `kernel` should cover the span a retrieved fact occupies: pooling keeps the neighbours of
    the attended tokens (a question attends to "pass key", the digits follow it). On
    SmolLM2-135M pass-key prompts, 11-21 kept the key where 7 lost it (benchmarks/
    eviction_model.py).
    """
    name = "snapkv"
    needs_window = True

    def __init__(self, kernel: int = 7) -> None:
        if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1 or \
                kernel % 2 == 0:
            raise ValueError(f"kernel must be a positive odd int, got {kernel!r}")
        self.kernel = kernel

    def score(self, ctx: ScoreContext) -> list[Tensor]:
        out = []
        for h in range(len(ctx.keys)):
            mass = ctx.query_mass(h).mean(0)
            out.append(max_pool_positions(mass, ctx.positions[h], self.kernel // 2))
        return out

    def signature(self) -> tuple:
        return (self.name, self.kernel)


class ExpectedAttention(Scorer):
    """Expected attention of future queries modelled as q ~ N(mu, Sigma), estimated per
    query head from the observation window: E[exp(s q.k)] = exp(s mu.k + s^2 k'Sigma k / 2)
    (the Gaussian moment generating function, exact under the model), normalised over all
    keys of the head on every rank (one gather of per-rank (max, sum)), averaged over the
    query heads of the KV head, times |v| when `value_norm` (a value's contribution to the
    output scales with its norm). The window's queries are post-RoPE and are taken as
    representative of future ones: rotation over future positions is not extrapolated.
    """
    name = "expected"
    needs_window = True

    def __init__(self, value_norm: bool = True) -> None:
        check_flag("value_norm", value_norm)
        self.value_norm = value_norm

    def score(self, ctx: ScoreContext) -> list[Tensor]:
        g, win = ctx.groups, ctx.window
        assert win is not None
        ad = acc_dtype(ctx.keys[0].dtype)
        q = win.q.to(ad)  # [w, Hq, D]
        mu = q.mean(0)
        dev = q - mu
        cov = (torch.einsum("whd,whe->hde", dev, dev) / max(1, q.shape[0] - 1))
        logits = []
        for h, k in enumerate(ctx.keys):
            kk = k.to(ad)
            hs = slice(h * g, (h + 1) * g)
            lin = ctx.scale * kk @ mu[hs].t()  # [n, G]
            quad = torch.stack([((kk @ c) * kk).sum(-1) for c in cov[hs]], 1)
            quad = quad * (ctx.scale ** 2 / 2)
            logits.append(lin + quad)
        # global log-normaliser per query head: one gather of (max, sum exp) per rank
        hq = mu.shape[0]
        mx = torch.stack([a.amax(0) if a.numel() else torch.full((g,), float("-inf"),
                          dtype=ad) for a in logits]).flatten().to(ad)  # [Hq]
        safe = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx).reshape(-1, g)
        sm = torch.stack([torch.exp(a - safe[h]).sum(0) for h, a in enumerate(logits)])
        mine = torch.cat([safe.flatten(), sm.flatten()])
        rows = gather_rows(mine, ctx.group, ctx.world) if ctx.world > 1 else mine[None]
        ms, ss = rows[:, :hq], rows[:, hq:]
        top = ms.amax(0)
        lse = (top + torch.log((ss * torch.exp(ms - top)).sum(0))).reshape(-1, g)
        out = []
        for h, a in enumerate(logits):
            p = torch.exp(a - lse[h]).mean(1)
            if self.value_norm:
                p = p * ctx.values[h].to(ad).norm(dim=-1)
            out.append(p.to(torch.float32))
        return out

    def signature(self) -> tuple:
        return (self.name, bool(self.value_norm))


class ContextReconstruction(Scorer):
    """Question-agnostic, in the manner of KVzip (Kim et al., 2025): the most attention a
    key receives while the model repeats the document after a "repeat the context" prompt
    (`eviction.reconstruct`; `hf_questions.reconstruct` runs the pass), max over the query
    heads of its KV head. Compressing without that pass raises on every rank."""
    name = "kvzip"
    reconstructs = True

    def score(self, ctx: ScoreContext) -> list[Tensor]:
        return list(ctx.state)


def max_pool_positions(x: Tensor, pos: Tensor, radius: int) -> Tensor:
    """out[i] = max of x[j] over tokens j with |pos[j] - pos[i]| <= radius (pos distinct)."""
    if radius == 0 or x.numel() < 2:
        return x
    order = torch.argsort(pos)
    xs, ps = x[order], pos[order]
    out = xs.clone()
    for d in range(1, radius + 1):  # distinct sorted positions: neighbours are <= radius away
        near = (ps[d:] - ps[:-d]) <= radius
        out[:-d] = torch.where(near, torch.maximum(out[:-d], xs[d:]), out[:-d])
        out[d:] = torch.where(near, torch.maximum(out[d:], xs[:-d]), out[d:])
    res = torch.empty_like(out)
    res[order] = out
    return res


SCORERS: tuple[type[Scorer], ...] = (StreamingLLM, KeyNorm, H2O, A2SF, TOVA, SnapKV,
                                     ExpectedAttention, ContextReconstruction)
BY_NAME = {c.name: c for c in SCORERS}


def make_scorer(name: str, **kwargs: object) -> Scorer:
    """A scorer by name: streaming, keynorm, h2o, a2sf, tova, snapkv, expected."""
    if name not in BY_NAME:
        raise ValueError(f"scorer must be one of {tuple(BY_NAME)}, got {name!r}")
    return BY_NAME[name](**kwargs)  # type: ignore[arg-type]
