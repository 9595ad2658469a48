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
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    groups = q.shape[2] // k.shape[2]
    kx = k.repeat_interleave(groups, dim=2)
    vx = v.repeat_interleave(groups, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, kx) * scale
    if causal:
        s_q, s_k = scores.shape[-2:]
        keep = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bhij,bjhd->bihd", probs, vx), lse
