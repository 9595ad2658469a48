"""What the eviction coordinator takes in (a decode step) and gives back (a record of
each compression), identical on every rank."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


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
class DecodeStep:
    """One decode step of one layer, as the coordinator needs it (B = max_seqs)."""
    q: Tensor
    """[B, Hq, D] the new queries."""
    lse: Tensor
    """[B, Hq] their global lse, the new token's own term included."""
    l_new: Tensor
    """[B, Hq] the new token's own scaled score."""
    logits: list[list[Tensor] | None]
    """Per sequence: per KV head the scaled scores [G, n_h] of this rank's hot tokens."""
    positions: list[int]
    owners: list[int]
    scale: float
