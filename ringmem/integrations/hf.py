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

Sliding windows, sinks, softcap, packing: each layer's window (`sliding_window`), GPT-OSS
sinks (`s_aux`) and Gemma 2's softcap (`softcap`) are read from the keywords transformers
passes and handed to `ring_attention` / the cache (`hf_masks`). Packed training batches
(position ids that restart per document, no mask) are split by document:

    ids, pos = shard_tokens(input_ids, cu_seqlens=cu, layout="zigzag")
    logits = model(input_ids=ids, position_ids=pos).logits

(layout "document" needs `cu_seq_lens_q=cu` in the model call as well).

Padding. With a `RingmemCache` (generation, `hf_cache`), padded tokens are never cached:
left-padded batches (what `generate` expects) are exact. In the cache-less ring path
(prefill/training on shards), causality already hides every pad that comes *after* a
sequence's real tokens, so right padding is exact for the real tokens; left padding would
let real tokens see pads, and is refused with a clear error (every rank checks the same
global condition).

State, without module globals. `register` puts a `RingAttention` object (the attention
function and its options) in transformers' `AttentionInterface` registry; whether a name is
ringmem's is read back from that registry (`registered`), and the last padding mask checked
(one check per forward, not per layer) is that object's state. The call a `RingmemCache`
leaves pending in `update` lives on the cache: `update` tags the key tensor it returns with
a weak reference to its cache (`PENDING_ATTR`), and the attention function receives exactly
that tensor, so it finds the cache there and asks it to confirm (layer, key) and clear it.
transformers passes the attention function no reference to the cache itself (the model
forward consumes `cache`), and `update` is not told which module calls it; the key tensor is
the one object both calls see. This module never imports `hf_cache` (which imports it).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..api import ring_attention, shard
from ..comm import Group, group_rank_world
from ..compiled import compiled_call
from ..config import check_ulysses
from ..options import check_schedule
from .hf_masks import PackingReader, call_options

PENDING_ATTR = "_ringmem_pending"
"""Attribute `RingmemCache.update` sets on the key tensor it returns: a weak reference to the
cache, whose pending (layer, key) the attention function then takes."""


class RingAttention:
    """The attention function `register` puts in transformers' registry: ring attention over
    the group (cache-less prefill / training), or the pending `RingmemCache`'s exact
    distributed attention. Holds its options and, per registration, the last padding mask
    checked."""

    def __init__(self, *, group: Group, layout: str, schedule: str, backend: str,
                 ulysses: int | str = 1) -> None:
        # checked here, at registration, not at the first layer of the first forward
        check_schedule(schedule)
        self.group, self.layout, self.schedule, self.backend = group, layout, schedule, backend
        self.ulysses = check_ulysses(ulysses)
        self._checked: tuple[Tensor, int] | None = None  # (mask, its version): once a forward
        self._packing = PackingReader()  # the forward's documents, read once

    def __call__(self, module: Any, query: Tensor, key: Tensor, value: Tensor,
                 attention_mask: Tensor | None, scaling: float | None = None,
                 dropout: float = 0.0, **kwargs: Any) -> tuple[Tensor, None]:
        """query [B, Hq, S, D], key/value [B, Hkv, S_kv, D] (GQA not expanded), mask [B, S_kv]
        or None; returns ([B, S, Hq, D], None), as transformers expects."""
        # first, so that a check raising below still clears the pending call
        cache = _take_pending(getattr(module, "layer_idx", -1), key)
        if dropout:
            raise ValueError(f"ringmem attention has no dropout, got dropout={dropout}")
        window, sinks, softcap = call_options(module, kwargs)
        if not getattr(module, "is_causal", True):
            raise ValueError("ringmem's transformers attention is for causal decoders")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"ringmem takes a 2-D padding mask [B, S], got shape "
                             f"{tuple(attention_mask.shape)}")
        if cache is not None:  # generation: the sharded cache attends and stores
            return cache.attention(module.layer_idx, query, key, value, attention_mask,
                                   scaling, window=window, sinks=sinks,
                                   softcap=softcap), None
        if key.shape[2] != query.shape[2]:
            raise ValueError(f"ring attention got {key.shape[2]} keys for {query.shape[2]} "
                             f"queries: a transformers cache is in use; generate with "
                             f"ringmem.integrations.hf_cache.RingmemCache (or pass "
                             f"use_cache=False)")
        query, key, value = _one_dtype(query, key, value)
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        if (torch.compiler.is_compiling() and attention_mask is None
                and kwargs.get("cu_seq_lens_q") is None and self.layout != "document"):
            # one op in the graph: it reads the documents off the position ids itself
            grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
            out, _ = compiled_call(q, k, v, causal=True, group=self.group, layout=self.layout,
                                   schedule=self.schedule, backend=self.backend,
                                   softmax_scale=scaling, stats=None, interconnect=None,
                                   cu_seqlens=None, window=(window, 0), sinks=sinks,
                                   softcap=softcap, ulysses=self.ulysses, mesh=None,
                                   grad=grad, position_ids=kwargs.get("position_ids"))
            return out, None
        cu = self._packing(kwargs, attention_mask, self.group, self.layout)
        if attention_mask is not None:
            self._check_right_padding(attention_mask, kwargs.get("position_ids"))
        out = ring_attention(q, k, v, causal=True, group=self.group,
                             layout=self.layout, schedule=self.schedule, backend=self.backend,
                             ulysses=self.ulysses, softmax_scale=scaling, cu_seqlens=cu,
                             window=(window, 0), sinks=sinks, softcap=softcap)
        return out, None

    def _check_right_padding(self, mask: Tensor, position_ids: Tensor | None) -> None:
        """Raise unless, in every row, every pad's global position follows every real
        token's. mask [B, S_local], position_ids [B or 1, S_local]; a collective."""
        if (self._checked is not None and self._checked[0] is mask
                and self._checked[1] == mask._version):
            return  # the model's other layers pass the same mask
        if position_ids is None:
            raise ValueError("a padding mask in ring attention needs position_ids (the "
                             "tokens' global positions)")
        valid = mask.bool()
        pos = position_ids.expand_as(valid).to(torch.int64)
        big = torch.iinfo(torch.int64).max
        last_real = torch.where(valid, pos, -1).amax(1)
        first_pad = torch.where(valid, big, pos).amin(1)
        both = torch.stack([last_real, -first_pad]).to(torch.float64)  # one MAX all-reduce
        if group_rank_world(self.group)[1] > 1:
            dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        bad = (both[0] > -both[1]).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"ring attention takes right padding only (pads after a row's "
                             f"real tokens); rows {bad} have a pad before a real token. Use "
                             f"tokenizer.padding_side='right', or generate with a "
                             f"RingmemCache")
        self._checked = (mask, mask._version)


def _one_dtype(*ts: Tensor) -> tuple[Tensor, ...]:
    """Under autocast, RoPE leaves q/k in fp32 beside a bf16 v: compute in the autocast
    dtype, as PyTorch's own attention does."""
    if len({t.dtype for t in ts}) == 1:
        return ts
    dev = ts[0].device.type
    want = (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev)
            else ts[0].dtype)
    return tuple(t.to(want) for t in ts)


def _take_pending(layer: int, key: Tensor) -> Any:
    """The cache whose `update` just returned `key` for `layer`, or None; the tag is removed
    and the cache's pending call cleared either way."""
    ref = getattr(key, PENDING_ATTR, None)
    if ref is None:
        return None
    delattr(key, PENDING_ATTR)
    cache = ref()
    return cache if cache is not None and cache.take_pending(layer, key) else None


def _mask(batch_size: int, q_length: int, kv_length: int, *args: Any,
          attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor | None:
    """The `AttentionMaskInterface` entry: the 2-D padding mask [B, S] as bool, or None."""
    # Causality is global and applied inside the ring / cache; only padding is passed on.
    # A given mask is passed on even when all ones: whether this rank's shard has pads
    # is local, and the ring path's padding check is a collective every rank must join.
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"ringmem takes a 2-D padding mask [B, S], got shape "
                         f"{tuple(attention_mask.shape)}")
    return attention_mask.bool()


def register(*, name: str = "ringmem", group: Group = None, layout: str = "zigzag",
             schedule: str = "auto", backend: str = "auto", ulysses: int | str = 1) -> str:
    """Register ring attention (and its mask function) with transformers under `name`;
    returns `name`, for `model.set_attn_implementation`.

    `schedule` ("auto", "kv", "q", "allgather") and `ulysses` (Ulysses degree: an int
    dividing the group size and the model's query heads, or "auto") are `ring_attention`'s,
    for the cache-less ring path; generation through a `RingmemCache` ignores them (the
    cache's prefill has its own `CacheConfig.prefill_schedule`)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    AttentionInterface.register(name, RingAttention(group=group, layout=layout,
                                                    schedule=schedule, backend=backend,
                                                    ulysses=ulysses))
    AttentionMaskInterface.register(name, _mask)
    return name


def registered(name: str | None) -> bool:
    """Whether `name` is an attention implementation `register` set up (read from the
    registry the models dispatch through, so a later registration under `name` counts)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    return isinstance(name, str) and isinstance(ALL_ATTENTION_FUNCTIONS.get(name), RingAttention)


def shard_tokens(input_ids: Tensor, *, group: Group = None, layout: str = "zigzag",
                 cu_seqlens: object = None) -> tuple[Tensor, Tensor]:
    """(this rank's input ids [B, S/P], their position ids [B, S/P]): global positions, or
    with `cu_seqlens` (packed documents, flash-attn offsets of the global row; one per row
    as a list or 2-D tensor) positions that restart at each document, as transformers'
    packing collators give them (layout "document" pads each document: pad ids are 0)."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [B, S] tensor, got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    group_rank_world(group)  # validates the group
    if cu_seqlens is not None:
        ids, pos = shard(input_ids, 1, group=group, layout=layout, cu_seqlens=cu_seqlens,
                         return_position_ids=True)
        return ids, pos.expand(ids.shape[0], -1).contiguous()
    pos = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    return (shard(input_ids, 1, group=group, layout=layout),
            shard(pos, 1, group=group, layout=layout))
