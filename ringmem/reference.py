"""Reference attention over a full (unsharded) sequence, written for clarity, not speed.

Used by the tests and benchmarks as the ground truth: compute it in float64.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def reference_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True,
                        softmax_scale: float | None = None) -> tuple[Tensor, Tensor]:
    """q [B, S, Hq, D], k/v [B, S, Hkv, D] -> (out [B, S, Hq, D], lse [B, Hq, S]).

    Computed in q's dtype (pass float64 tensors for a reference). Causal means key j is
    visible from query i iff j <= i (global positions). Differentiable by autograd.
    """
    s_q, s_k = q.shape[1], k.shape[1]
    keep = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device)
    return masked_reference(q, k, v, keep.tril() if causal else keep,
                            softmax_scale=softmax_scale)


def dense_mask(seq_len: int, *, causal: bool = True, window: tuple[int, int] = (-1, -1),
               cu_seqlens: list[int] | tuple[int, ...] | None = None) -> Tensor:
    """Boolean [S, S]: key j visible from query i, from the definitions directly (same
    document, j <= i when causal, i - left <= j <= i + right)."""
    i = torch.arange(seq_len)[:, None]
    j = torch.arange(seq_len)[None, :]
    keep = torch.ones(seq_len, seq_len, dtype=torch.bool)
    if cu_seqlens is not None:
        doc = torch.bucketize(torch.arange(seq_len), torch.as_tensor(list(cu_seqlens))[1:],
                              right=True)
        keep &= doc[:, None] == doc[None, :]
    if causal:
        keep &= j <= i
    if window[0] >= 0:
        keep &= j >= i - window[0]
    if window[1] >= 0:
        keep &= j <= i + window[1]
    return keep


def masked_reference(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, *,
                     softmax_scale: float | None = None, sinks: Tensor | None = None,
                     softcap: float | None = None) -> tuple[Tensor, Tensor]:
    """Attention under an explicit mask `keep` ([S, S] or [B, S, S]), with optional per-head
    sink logits [Hq] and logit softcap. Rows that see nothing give out 0 (lse -inf, or the
    sink). Differentiable by autograd (sinks included)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    groups = q.shape[2] // k.shape[2]
    kx = k.repeat_interleave(groups, dim=2)
    vx = v.repeat_interleave(groups, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, kx) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    keep = keep if keep.dim() == 3 else keep[None]
    s = s.masked_fill(~keep[:, None], float("-inf"))
    if sinks is not None:
        col = sinks.to(s.dtype)[None, :, None, None].expand(*s.shape[:3], 1)
        s = torch.cat([s, col], dim=-1)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1).clamp(min=torch.finfo(s.dtype).min))
    p = torch.nan_to_num(p)[..., : keep.shape[-1]]
    return torch.einsum("bhij,bjhd->bihd", p, vx), lse
