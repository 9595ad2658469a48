"""The configuration of a `ShardedKVCache`: model dims, capacity, layout, merge, backend."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..arguments import check_flag, dtype_error
from ..backends import get_backend
from ..layouts import check_layout
from ..options import check_schedule

MERGES = ("allgather", "allreduce")
"""Cross-rank decode merges: one all-gather, or two all-reduces."""


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """A sharded KV cache's shape and options. No Ulysses degree: the pools are sharded by
    sequence over the ranks with every head on each, so prefill stays a ring over them."""
    num_layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    capacity: int
    """Tokens per rank per layer (rounded up to whole pages)."""
    page_size: int = 256
    max_seqs: int = 1
    """Sequences decoded together (batch rows)."""
    dtype: torch.dtype = torch.bfloat16
    device: str = "cpu"
    layout: str = "stripe"
    """How prefill chunks are split over ranks; stripe keeps counts equal to within a token."""
    merge: str = "allgather"
    """Cross-rank decode merge: one all-gather, or two all-reduces."""
    prefill_schedule: str = "kv"
    """Ring schedule of a prefill chunk's causal self-attention: "kv", "q" or "allgather"
    (the pass over the cached prefix always moves the chunk's queries)."""
    decode_backend: str = "paged"
    """The backend of decode's local pass. "paged" reads the pages in place: Triton's
    run-list kernel on CUDA, the compiled kernel on CPU ("cpu", built on first use; the
    torch pass where it cannot be built), the torch backend's pass elsewhere ("auto" is
    the same); another backend name picks that one."""
    windows: tuple[int, ...] = ()
    """Per layer, the sliding window's left size (a query at p sees keys p - left .. p;
    -1: full causal attention); empty: every layer full. A windowed layer keeps only the
    last `left` tokens of each sequence (`window.py`), in pools sized for that."""
    check_finite: bool = True
    """Refuse K/V holding NaN or inf before caching them (prefill and decode raise on every
    rank, nothing is stored): a cached non-finite key makes every later step NaN. One
    `isfinite` per call, read on the host: on CUDA a host sync per call, so a loop that must
    never sync may set False (and then owns the inputs' finiteness)."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "q_heads", "kv_heads", "head_dim", "capacity", "page_size",
                     "max_seqs"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if self.q_heads % self.kv_heads:
            raise ValueError(f"q_heads={self.q_heads} must be a multiple of "
                             f"kv_heads={self.kv_heads}")
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {self.dtype!r}")
        if dtype_error("the cache", self.dtype):
            raise dtype_error("the cache", self.dtype)
        check_layout(self.layout)
        check_flag("check_finite", self.check_finite)
        w = self.windows
        if not isinstance(w, tuple) or not all(isinstance(x, int) and not isinstance(x, bool)
                                               and x >= -1 for x in w):
            raise ValueError(f"windows must be a tuple of ints >= -1 (one per layer, -1: "
                             f"full attention), got {w!r}")
        if w and len(w) != self.num_layers:
            raise ValueError(f"windows must have one entry per layer ({self.num_layers}), "
                             f"got {len(w)}")
        if self.merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}, got {self.merge!r}")
        check_schedule(self.prefill_schedule, "prefill_schedule", auto=False)
        if self.decode_backend != "paged":
            get_backend(self.decode_backend, torch.device(self.device), self.dtype,
                        self.head_dim)

    def window(self, layer: int) -> int:
        """The left window size of `layer` (-1: full causal attention)."""
        return self.windows[layer] if self.windows else -1

    def layer_pages(self, layer: int) -> int:
        """Pages per rank of `layer`'s pool: a windowed layer holds at most its window per
        sequence, so its pool is no larger than that (at least one page)."""
        full = -(-self.capacity // self.page_size)
        left = self.window(layer)
        if left < 0:
            return full
        return max(1, min(full, self.max_seqs * -(-left // self.page_size)))
