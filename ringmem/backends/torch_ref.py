"""Plain-PyTorch block backend: any device, any float dtype (float64 included).

Readable reference for every fast backend. Half-precision inputs are computed in fp32.
GQA is handled by grouping query heads, never by copying K/V.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..masking import band_mask
from ..partial import Partial, acc_dtype, attend, probs
from .base import Backend, Mask


def _grouped(q: Tensor, k: Tensor, v: Tensor):
    """q -> [B, Hkv, G, Sq, D]; k, v -> [B, Hkv, 1, Sk, D] in the compute dtype."""
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    ct = acc_dtype(q.dtype)
    qg = q.to(ct).reshape(b, sq, hkv, hq // hkv, d).permute(0, 2, 3, 1, 4)
    kg = k.to(ct).permute(0, 2, 1, 3).unsqueeze(2)
    vg = v.to(ct).permute(0, 2, 1, 3).unsqueeze(2)
    return qg, kg, vg


def _scores(qg: Tensor, kg: Tensor, scale: float, mask: Mask,
            softcap: float) -> tuple[Tensor, Tensor | None]:
    """(masked logits, tanh of the capped logits or None without a softcap)."""
    s = torch.matmul(qg, kg.transpose(-1, -2)) * scale
    t = None
    if softcap:
        t = torch.tanh(s / softcap)
        s = t * softcap
    if mask is not False and mask != (None, None):
        sq, sk = s.shape[-2:]
        s = s.masked_fill(~band_mask(mask, sq, sk, s.device), float("-inf"))
    return s, t


class TorchBackend(Backend):
    name = "torch"

    def unsupported(self, device: torch.device, dtype: torch.dtype, head_dim: int, *,
                    bands: bool = False, softcap: bool = False) -> str | None:
        return None

    def fwd(self, q: Tensor, k: Tensor, v: Tensor, scale: float, causal: Mask, *,
            softcap: float = 0.0) -> tuple[Tensor, Tensor]:
        b, sq, hq, d = q.shape
        qg, kg, vg = _grouped(q, k, v)
        s, _ = _scores(qg, kg, scale, causal, softcap)
        lse = torch.logsumexp(s, dim=-1)  # [B, Hkv, G, Sq]
        out = torch.matmul(probs(s, lse), vg)  # [B, Hkv, G, Sq, D]
        out = out.permute(0, 3, 1, 2, 4).reshape(b, sq, hq, d).to(q.dtype)
        return out, lse.reshape(b, hq, sq)

    def bwd(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
            scale: float, causal: Mask, *, softcap: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
        b, sq, hq, d = q.shape
        hkv = k.shape[2]
        g = hq // hkv
        qg, kg, vg = _grouped(q, k, v)
        ct = qg.dtype
        dog = dout.to(ct).reshape(b, sq, hkv, g, d).permute(0, 2, 3, 1, 4)
        og = out.to(ct).reshape(b, sq, hkv, g, d).permute(0, 2, 3, 1, 4)
        lse_g = lse.to(ct).reshape(b, hkv, g, sq)
        s, t = _scores(qg, kg, scale, causal, softcap)
        p = probs(s, lse_g)                                         # [B, Hkv, G, Sq, Sk]
        dv = torch.matmul(p.transpose(-1, -2), dog).sum(2)          # [B, Hkv, Sk, D]
        dp = torch.matmul(dog, vg.transpose(-1, -2))
        delta = (dog * og).sum(-1, keepdim=True)                    # rowsum(dO * O), global O
        ds = p * (dp - delta)
        if t is not None:  # through softcap * tanh(s / softcap)
            ds = ds * (1 - t * t)
        dq = torch.matmul(ds, kg) * scale                           # [B, Hkv, G, Sq, D]
        dk = torch.matmul(ds.transpose(-1, -2), qg).sum(2) * scale  # [B, Hkv, Sk, D]
        dq = dq.permute(0, 3, 1, 2, 4).reshape(b, sq, hq, d)
        return dq, dk.permute(0, 2, 1, 3), dv.permute(0, 2, 1, 3)

    def decode(self, q: Tensor, k: Tensor, v: Tensor, runs: Sequence[tuple[int, int]],
               scale: float, *, head_runs: Sequence[Sequence[tuple[int, int]]] | None = None,
               logits: list[Tensor] | None = None, softcap: float = 0.0) -> Partial:
        """Reads the pages in place (no gather); `head_runs` for heads that hold different
        tokens, `logits` to keep each key's score, `softcap` to cap the scores (see
        `ringmem.partial.attend`)."""
        return attend(q, k, v, scale, runs=runs, head_runs=head_runs, logits=logits,
                      softcap=softcap)
