"""Hugging Face transformers: ring attention as an attention implementation (lazy import).

Distributed prefill/training: every rank runs the model on its shard of the tokens (the
layout decides which), with the tokens' global position ids, and attention runs over the
whole sequence through the ring:

    name = ringmem.integrations.hf.register(layout="zigzag")
    model.set_attn_implementation(name)
    ids, pos = ringmem.integrations.hf.shard_tokens(input_ids, layout="zigzag")
    logits = model(input_ids=ids, position_ids=pos).logits      # this rank's tokens

A matching `AttentionMaskInterface` entry is registered too: a name registered only as an
attention function would receive no mask, and padding would be silently ignored.

Padding. With a `RingmemCache` (generation, `hf_cache`), padded tokens are never cached:
left-padded batches (what `generate` expects) are exact. In the cache-less ring path (prefill/training on shards), causality
already hides every pad that comes *after* a sequence's real tokens, so right padding is
exact for the real tokens; left padding would let real tokens see pads, and is refused with
a clear error (every rank checks the same global condition).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
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
                  dropout: float = 0.0, **kwargs: Any) -> tuple[Tensor, None]:
        # query [B, Hq, S, D], key/value [B, Hkv, S_kv, D] (GQA not expanded)
        from .hf_cache import take_pending  # only importable with transformers present
        cache = take_pending(getattr(module, "layer_idx", -1), key)  # first: always cleared
        if dropout:
            raise ValueError(f"ringmem attention has no dropout, got dropout={dropout}")
        if getattr(module, "sliding_window", None):
            raise ValueError(f"layer {getattr(module, 'layer_idx', '?')} uses a sliding window "
                             f"({module.sliding_window}); ringmem computes full causal "
                             f"attention only")
        if not getattr(module, "is_causal", True):
            raise ValueError("ringmem's transformers attention is for causal decoders")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"ringmem takes a 2-D padding mask [B, S], got shape "
                             f"{tuple(attention_mask.shape)}")
        if cache is not None:  # generation: the sharded cache attends and stores
            return cache.attention(module.layer_idx, query, key, value, attention_mask,
                                   scaling), None
        if key.shape[2] != query.shape[2]:
            raise ValueError(f"ring attention got {key.shape[2]} keys for {query.shape[2]} "
                             f"queries: a transformers cache is in use; generate with "
                             f"ringmem.integrations.hf_cache.RingmemCache (or pass "
                             f"use_cache=False)")
        if attention_mask is not None:
            _check_right_padding(attention_mask, kwargs.get("position_ids"), group)
        out = ring_attention(query.transpose(1, 2), key.transpose(1, 2),
                             value.transpose(1, 2), causal=True, group=group, layout=layout,
                             schedule=schedule, backend=backend, softmax_scale=scaling)
        return out, None  # [B, S_local, Hq, D], as transformers expects

    def mask(batch_size: int, q_length: int, kv_length: int, *args: Any,
             attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor | None:
        # Causality is global and applied inside the ring / cache; only padding is passed on.
        # A given mask is passed on even when all ones: whether this rank's shard has pads
        # is local, and the ring path's padding check is a collective every rank must join.
        if attention_mask is None:
            return None
        if attention_mask.dim() != 2:
            raise ValueError(f"ringmem takes a 2-D padding mask [B, S], got shape "
                             f"{tuple(attention_mask.shape)}")
        return attention_mask.bool()

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, mask)
    REGISTERED.add(name)
    return name


REGISTERED: set[str] = set()
"""Attention implementation names `register` has set up (RingmemCache checks for one)."""


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


_checked: list = []  # the last mask verified and its version (one check per forward)


def _check_right_padding(mask: Tensor, position_ids: Tensor | None, group: Group) -> None:
    """Raise unless, in every row, every pad's global position follows every real token's."""
    if _checked and _checked[0] is mask and _checked[1] == mask._version:
        return
    if position_ids is None:
        raise ValueError("a padding mask in ring attention needs position_ids (the tokens' "
                         "global positions)")
    valid = mask.bool()
    pos = position_ids.expand_as(valid).to(torch.int64)
    big = torch.iinfo(torch.int64).max
    last_real = torch.where(valid, pos, -1).amax(1)
    first_pad = torch.where(valid, big, pos).amin(1)
    both = torch.stack([last_real, -first_pad]).to(torch.float64)  # one MAX all-reduce
    if group_rank_world(group)[1] > 1:
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    bad = (both[0] > -both[1]).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"ring attention takes right padding only (pads after a row's real "
                         f"tokens); rows {bad} have a pad before a real token. Use "
                         f"tokenizer.padding_side='right', or generate with a RingmemCache")
    _checked[:] = [mask, mask._version]
