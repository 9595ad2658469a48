"""The block-attention backend protocol every ring step calls.

Tensors are [B, S, H, D] (flash-attn layout); K/V may have fewer heads than Q (GQA/MQA:
query head h uses key head h // (Hq // Hkv)). `causal=True` means a square block with key
j visible from query i iff j <= i. lse is [B, Hq, Sq], natural log, fp32 (fp64 for fp64).
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Backend(Protocol):
    name: str

    def unsupported(self, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
        """Why this backend cannot run these inputs, or None when it can."""

    def fwd(self, q: Tensor, k: Tensor, v: Tensor, scale: float,
            causal: bool) -> tuple[Tensor, Tensor]:
        """(out [B, Sq, Hq, D] in q.dtype, lse [B, Hq, Sq] fp32)."""

    def bwd(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
            scale: float, causal: bool) -> tuple[Tensor, Tensor, Tensor]:
        """(dq, dk, dv) of this block given the *global* out and lse of the query rows.

        Gradients may come back in q.dtype or wider; the ring accumulates them in fp32.
        """
