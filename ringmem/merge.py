"""Log-sum-exp merge of partial attention results.

A partial result over a subset of keys is (out, lse) with out = softmax-weighted values over
that subset and lse = log sum exp of its scores. Two partials over disjoint key sets merge
exactly: lse = logaddexp(lse1, lse2), out = out1 * exp(lse1 - lse) + out2 * exp(lse2 - lse).
Rows that have seen no key yet carry lse = -inf and out = 0.
"""
from __future__ import annotations

import torch
from torch import Tensor


def merge_(out: Tensor, lse: Tensor, blk_out: Tensor, blk_lse: Tensor) -> None:
    """Merge a block partial into an accumulator, in place.

    out: [B, S, H, D] accumulator (fp32 or fp64); lse: [B, H, S] same dtype.
    blk_out: [B, S, H, D] any float dtype; blk_lse: [B, H, S].
    """
    new = torch.logaddexp(lse, blk_lse.to(lse.dtype))
    # rows that still have no keys keep lse = -inf; shift by 0 there to avoid inf - inf
    ref = torch.where(torch.isneginf(new), torch.zeros_like(new), new)
    a = torch.exp(lse - ref).transpose(1, 2).unsqueeze(-1)
    b = torch.exp(blk_lse.to(lse.dtype) - ref).transpose(1, 2).unsqueeze(-1)
    out.mul_(a).addcmul_(blk_out.to(out.dtype), b)
    lse.copy_(new)


def merge_partials(outs: list[Tensor], lses: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Merge several partials (out [B, S, H, D], lse [B, H, S]) into one, in fp32 or fp64."""
    if not outs or len(outs) != len(lses):
        raise ValueError(f"need matching non-empty lists, got {len(outs)} outs, {len(lses)} lses")
    acc = torch.float64 if outs[0].dtype == torch.float64 else torch.float32
    out = torch.zeros(outs[0].shape, dtype=acc, device=outs[0].device)
    lse = torch.full(lses[0].shape, float("-inf"), dtype=acc, device=lses[0].device)
    for o, l in zip(outs, lses):
        merge_(out, lse, o, l)
    return out, lse
