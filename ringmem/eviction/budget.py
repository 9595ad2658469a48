"""Eviction policy: scorer, budget, protected tokens, allocation across heads, when to run.

Budget unit: tokens per (layer, KV head), counted over all ranks together (one global
budget, wherever the tokens live). `budget` is an int (absolute) or a float in (0, 1] (a
ratio of the context seen so far, rounded up, never below the protected floor).

Granularity and allocation, per layer:
* granularity "layer": one score per token (the mean over KV heads); every head keeps the
  same `budget` tokens, so evicted tokens free their slots in every head.
* granularity "head", allocation "uniform": each KV head keeps its own top-`budget` tokens.
* granularity "head", allocation "adaptive" (AdaKV): the layer keeps Hkv x budget
  (head, token) entries chosen across heads by score, each head first guaranteed
  floor(floor x budget) of its own best (a safeguard for heads with flat scores). One head
  may then hold more than `budget`; the layer's total never exceeds Hkv x budget.
* granularity "head", allocation "global" (cross-layer AdaKV): the same, with one pool over
  every layer: the cache keeps L x Hkv x budget entries, so layers whose attention is spread
  out (typically the first ones) get more than `budget` and focused layers less. Every layer
  is compressed together (`ShardedKVCache.compress()` without a layer; during prefill and
  decode, after the last layer's step).

The first `sinks` positions and the last `recent` positions are always kept (StreamingLLM's
floor) under every scorer: they score +inf. A budget must leave room for them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .actions import EvictionAction, HardDrop
from .scorers import Scorer

GRANULARITIES = ("head", "layer")
ALLOCATIONS = ("uniform", "adaptive", "global")
PREFILL = ("after", "chunk")


def _int(name: str, val: object, lo: int) -> None:
    if isinstance(val, bool) or not isinstance(val, int) or val < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {val!r}")


@dataclass(frozen=True, kw_only=True)
class EvictionPolicy:
    scorer: Scorer
    """Importance scorer (`ringmem.eviction.scorers`)."""
    budget: int | float
    """Tokens kept per (layer, KV head) over all ranks: int, or float ratio of the context."""
    sinks: int = 4
    """First positions always kept (attention sinks)."""
    recent: int = 32
    """Most recent positions always kept."""
    granularity: str = "head"
    """"head": each KV head keeps its own tokens; "layer": all heads keep the same tokens."""
    allocation: str = "uniform"
    """"uniform", "adaptive" (AdaKV, across the KV heads of a layer) or "global" (across
    every layer and KV head)."""
    floor: float = 0.2
    """Adaptive and global: share of its budget each head keeps whatever the others score."""
    observe: int = 32
    """Observation window: the last queries (prompt or decode) kept for window scorers."""
    prefill: str = "after"
    """"after": compress when `ShardedKVCache.compress` is called (after prefill);
    "chunk": also after every prefill chunk (bounded memory during chunked prefill)."""
    decode_every: int = 0
    """Compress every N decode steps of a layer (0: never during decode). Between two
    compressions a head grows by at most N tokens past its budget."""
    action: EvictionAction = field(default_factory=HardDrop)
    """Receives evicted entries: `HardDrop`, or a tier store's `demote`."""
    rebalance: float = 0.0
    """> 1: after a compression, move tokens from the most to the least loaded ranks while
    the largest per-rank load exceeds `rebalance` x the mean. 0: never."""

    def __post_init__(self) -> None:
        if not isinstance(self.scorer, Scorer):
            raise TypeError(f"scorer must be a ringmem.eviction Scorer, got "
                            f"{type(self.scorer).__name__}")
        b = self.budget
        if isinstance(b, bool) or not isinstance(b, (int, float)):
            raise TypeError(f"budget must be an int or a float ratio, got {b!r}")
        if isinstance(b, float) and not (0 < b <= 1):
            raise ValueError(f"a ratio budget must be in (0, 1], got {b!r}")
        _int("sinks", self.sinks, 0)
        _int("recent", self.recent, 0)
        if isinstance(b, int) and b < max(1, self.sinks + self.recent):
            raise ValueError(f"budget={b} leaves no room for the protected sinks={self.sinks} "
                             f"+ recent={self.recent} tokens (and must be >= 1)")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got "
                             f"{self.granularity!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got "
                             f"{self.allocation!r}")
        if self.allocation != "uniform" and self.granularity != "head":
            raise ValueError(f"allocation={self.allocation!r} allocates across KV heads: it "
                             f"needs granularity='head'")
        if isinstance(self.floor, bool) or not isinstance(self.floor, (int, float)) or \
                not 0 <= self.floor <= 1:
            raise ValueError(f"floor must be a number in [0, 1], got {self.floor!r}")
        _int("observe", self.observe, 1)
        if self.prefill not in PREFILL:
            raise ValueError(f"prefill must be one of {PREFILL}, got {self.prefill!r}")
        _int("decode_every", self.decode_every, 0)
        if not isinstance(self.action, EvictionAction):
            raise TypeError(f"action must have a demote(layer, seq, head, pos, k, v, score) "
                            f"method, got {type(self.action).__name__}")
        r = self.rebalance
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (r == 0 or r > 1):
            raise ValueError(f"rebalance must be 0 (off) or a factor > 1, got {r!r}")

    @property
    def protected(self) -> int:
        return self.sinks + self.recent

    def tokens(self, seen: int) -> int:
        """The per-(layer, KV head) budget for a context of `seen` tokens."""
        if isinstance(self.budget, int):
            return self.budget
        return max(math.ceil(self.budget * seen), self.protected, 1)

    def head_floor(self, seen: int) -> int:
        """Adaptive and global: tokens each head keeps of its own best before the pool."""
        return math.floor(self.floor * self.tokens(seen))

    def signature(self) -> tuple:
        """What every rank must agree on (encoded by `agree`)."""
        return (*self.scorer.signature(), self.budget, self.sinks, self.recent,
                self.granularity, self.allocation, float(self.floor), self.observe,
                self.prefill, self.decode_every, float(self.rebalance))
