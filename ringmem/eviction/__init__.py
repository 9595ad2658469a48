"""Global importance-based eviction across ranks (coordinator first; scorers to follow)."""
from .topk import global_topk_mask

__all__ = ["global_topk_mask"]
