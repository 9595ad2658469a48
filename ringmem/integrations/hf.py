"""Hugging Face transformers: ring attention as an attention implementation (lazy import).

Distributed prefill/training: every rank runs the model on its shard of the tokens (the
layout decides which), with the tokens' global position ids, and attention runs over the
whole sequence through the ring:

    name = ringmem.integrations.hf.register(layout="zigzag")
    model.set_attn_implementation(name)
    ids, pos = ringmem.integrations.hf.shard_tokens(input_ids, layout="zigzag")
    logits = model(input_ids=ids, position_ids=pos).logits      # this rank's tokens

A matching `AttentionMaskInterface` entry is registered too: a name registered only as an
attention function would receive no mask, and padding would be silently ignored. Padding
is refused with a clear error until the ring takes key-padding masks.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..api import ring_attention, shard
from ..comm import Group, group_rank_world


def register(*, name: str = "ringmem", group: Group = None, layout: str = "zigzag",
             schedule: str = "auto", backend: str = "auto") -> str:
    """Register ring attention (and its mask function) with transformers under `name`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    def attention(module: Any, query: Tensor, key: Tensor, value: Tensor,
                  attention_mask: Tensor | None, scaling: float | None = None,
                  dropout: float = 0.0, **_: Any) -> tuple[Tensor, None]:
        # query [B, Hq, S_local, D], key/value [B, Hkv, S_local, D] (GQA not expanded)
        if dropout:
            raise ValueError(f"ringmem attention has no dropout, got dropout={dropout}")
        if getattr(module, "sliding_window", None):
            raise ValueError(f"layer {getattr(module, 'layer_idx', '?')} uses a sliding window "
                             f"({module.sliding_window}); ringmem computes full causal "
                             f"attention only")
        if not getattr(module, "is_causal", True):
            raise ValueError("ringmem's transformers attention is for causal decoders")
        out = ring_attention(query.transpose(1, 2), key.transpose(1, 2),
                             value.transpose(1, 2), causal=True, group=group, layout=layout,
                             schedule=schedule, backend=backend, softmax_scale=scaling)
        return out, None  # [B, S_local, Hq, D], as transformers expects

    def mask(batch_size: int, q_length: int, kv_length: int, *args: Any,
             attention_mask: Tensor | None = None, **kwargs: Any) -> None:
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("ringmem's distributed attention does not take padding masks "
                             "yet: pass unpadded sequences (batch them by length)")
        return None  # causality is global and applied inside the ring

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, mask)
    return name


def shard_tokens(input_ids: Tensor, *, group: Group = None,
                 layout: str = "zigzag") -> tuple[Tensor, Tensor]:
    """(this rank's input ids [B, S/P], their global position ids [B, S/P])."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [B, S] tensor, got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    group_rank_world(group)  # validates the group
    pos = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    return (shard(input_ids, 1, group=group, layout=layout),
            shard(pos, 1, group=group, layout=layout))
