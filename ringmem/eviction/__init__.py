"""Global importance-based eviction across ranks: scorers, budgets, the coordinator.

Attach a policy to a cache: `ShardedKVCache(config, eviction=EvictionPolicy(scorer=SnapKV(),
budget=0.05))`; compress after prefill with `cache.compress()` (or per prefill chunk /
every N decode steps, see `EvictionPolicy`).
"""
from .actions import EvictionAction, HardDrop
from .budget import EvictionPolicy
from .coordinator import Coordinator
from .records import EvictionRecord
from .scorers import (
                      A2SF,
                      H2O,
                      SCORERS,
                      TOVA,
                      ContextReconstruction,
                      ExpectedAttention,
                      KeyNorm,
                      ScoreContext,
                      Scorer,
                      SnapKV,
                      StreamingLLM,
                      Window,
                      make_scorer,
)
from .topk import global_topk_mask, grouped_topk_mask
from .view import Dims, EvictionView, HeadEntries

__all__ = ["A2SF", "ContextReconstruction", "Coordinator", "Dims", "EvictionAction",
           "EvictionPolicy", "EvictionRecord", "EvictionView", "ExpectedAttention", "H2O",
           "HardDrop", "HeadEntries", "KeyNorm",
           "SCORERS", "ScoreContext", "Scorer", "SnapKV", "StreamingLLM", "TOVA", "Window",
           "global_topk_mask", "grouped_topk_mask", "make_scorer"]
