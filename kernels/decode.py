"""Split-KV decode (flash-decoding) in Triton: a few query tokens against a long K/V shard.

The forward kernel of `attention.py` runs once per KV split (packing the G query heads of
each KV head into the tile rows, so K/V are read once per group), writing fp32 partials;
the fused merge of `merge.py` combines the splits. The result is this rank's partial
(out, lse) for the cross-rank merge.
"""
from __future__ import annotations

import torch
import triton
from torch import Tensor

from .attention import _launch_fwd, _unit_last, split_plan
from .merge import merge_stacked


def default_splits(b: int, hkv: int, sk: int, device: torch.device) -> int:
    """Enough programs to fill the device, each with at least 512 keys."""
    sms = (torch.cuda.get_device_properties(device).multi_processor_count
           if device.type == "cuda" else 4)
    return max(1, min(triton.cdiv(2 * sms, b * hkv), triton.cdiv(sk, 512)))


def decode_partial(q: Tensor, k: Tensor, v: Tensor, scale: float,
                   num_splits: int | None = None) -> tuple[Tensor, Tensor]:
    """q [B, Sq, Hq, D] (Sq small), k/v [B, Sk, Hkv, D], non-causal ->
    (out [B, Sq, Hq, D] fp32, lse [B, Hq, Sq] fp32)."""
    q, k, v = (_unit_last(x) for x in (q, k, v))
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    _, splits = split_plan(sk, num_splits or default_splits(b, hkv, sk, q.device), d)
    outs = torch.empty(splits, b, sq, hq, d, dtype=torch.float32, device=q.device)
    lses = torch.full((splits, b, hq, sq), float("-inf"), dtype=torch.float32,
                      device=q.device)
    _launch_fwd(q, k, v, outs, lses, scale, False, 0, 0, splits)
    if splits == 1:
        return outs[0], lses[0]
    return merge_stacked(outs, lses)
