"""A transformers `Cache` over `ShardedKVCache`: sharded prefill, exact distributed decode,
and `generate` unchanged on every rank.

How it plugs in: a model calls `cache.update(k, v, layer)` right before attention. This
cache stores nothing there; it records (layer, k) as its pending call and tags `k` with a weak
reference to itself, and ringmem's attention function (`hf.register`), which receives that
same `k`, takes the pending call from the cache and runs the cache's exact distributed
attention, which also stores the new K/V where they belong:

* query length 1: decode. The token is the same on every rank; it attends to the whole
  sharded cache and is stored on the least-loaded rank.
* inside `prefill(...)`: every rank holds its shard of a chunk of the prompt (positions per
  the cache's layout); chunks attend to the cached prefix on all ranks plus themselves.
* otherwise (plain `model.generate(prompt)` on every rank): the replicated tokens are split by
  the layout, attended the same way, and the outputs all-gathered. The MLPs then run
  replicated; `prefill`/`generate` below shard them too.

Padding (left padding, as `generate` expects, through `model.generate(..., attention_mask=...,
cache=cache)`): tokens whose attention mask is 0 are never cached, and no real token
attends to one. The cache's own length (what transformers sees) counts every token fed,
pads included, so transformers' position bookkeeping is unchanged.

The argument's name. Recent transformers (checked: 5.24) name it `cache`; `past_key_values`
still works there but warns (FutureWarning) in model forwards, `prepare_inputs_for_generation`
and the mask builders (to be removed in 5.40) and in `generate` (removed in 6.0). The cache
works under either name; `cache_kwargs(model, cache)` gives the name the installed release
takes, and this module's `prefill`/`generate` use it.
"""
from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from ..api import unshard
from ..cache.sharded import CacheConfig, ShardedKVCache
from ..comm import Group
from ..layouts import chunk_count, positions
from .hf import PENDING_ATTR, registered
from .hf_masks import layer_windows


def cache_kwargs(model: Any, cache: Cache) -> dict[str, Cache]:
    """The keyword argument that hands `cache` to `model(...)` / `model.generate(...)` in the
    installed transformers: {"cache": cache} where the model's forward takes `cache`
    (generate forwards its model kwargs there), else {"past_key_values": cache}."""
    names: set[str] = set()
    for forward in (getattr(model, "forward", None), getattr(type(model), "forward", None)):
        try:  # the instance's forward may be wrapped (hooks); the class's is the model's own
            names |= set(inspect.signature(forward).parameters)
        except (TypeError, ValueError):
            pass
    return {"cache" if "cache" in names else "past_key_values": cache}


class _Layer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, owner: "RingmemCache", idx: int) -> None:
        super().__init__()
        # a cache over a loaded `ShardedKVCache.load` resumes at the tokens it was fed
        self.owner, self.idx, self.seen = owner, idx, owner.kv.next_position(0, idx)
        self.is_initialized = True

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any,
               **kwargs: Any) -> tuple[Tensor, Tensor]:
        owner = self.owner
        if owner._pending is not None:  # the previous layer's attention never took its keys
            owner._pending = None
            raise ValueError("RingmemCache needs ringmem's attention: call "
                             "model.set_attn_implementation(ringmem.integrations.hf.register())")
        owner._pending = (self.idx, key_states)
        # the attention function receives this very tensor: its way back to the cache
        setattr(key_states, PENDING_ATTR, weakref.ref(owner))
        chunk = owner._chunk  # packed rows (`prefill_rows`): reset after the pass
        self.seen += (key_states.shape[-2] if chunk is None else
                      chunk[0] if isinstance(chunk[0], int) else 0)
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    @property
    def batch_size(self) -> int:
        return self.owner.kv.config.max_seqs

    def reset(self) -> None:
        self.seen = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise ValueError("RingmemCache does not support beam search (num_beams > 1)")

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("RingmemCache cannot be cropped (assisted / speculative decoding)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise ValueError("RingmemCache holds a fixed batch: set max_seqs instead of "
                         "num_return_sequences")

    def batch_select_indices(self, indices: Tensor) -> None:
        raise ValueError("RingmemCache holds a fixed batch; it cannot select rows")


def cache_config(model: Any, *, capacity: int, max_seqs: int = 1, page_size: int = 256,
                 layout: str = "stripe", **options: Any) -> CacheConfig:
    """The `CacheConfig` of a cache shaped for `model` (layers, heads, head_dim, dtype,
    device and sliding windows from it)."""
    c = model.config
    if not registered(getattr(c, "_attn_implementation", None)):
        raise ValueError(f"the model's attention implementation is "
                         f"{getattr(c, '_attn_implementation', None)!r}; RingmemCache needs "
                         f"ringmem's: model.set_attn_implementation(hf.register())")
    windows = layer_windows(c)  # a windowed layer keeps only its window
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    p = next(model.parameters())
    return CacheConfig(num_layers=c.num_hidden_layers, q_heads=heads,
                       kv_heads=getattr(c, "num_key_value_heads", None) or heads,
                       head_dim=head_dim, capacity=capacity, page_size=page_size,
                       max_seqs=max_seqs, dtype=p.dtype, device=str(p.device), layout=layout,
                       windows=tuple(windows) if any(w >= 0 for w in windows) else (),
                       **options)


class RingmemCache(Cache):
    """transformers `Cache` backed by a `ShardedKVCache` (one per process group)."""

    def __init__(self, kv: ShardedKVCache) -> None:
        if not isinstance(kv, ShardedKVCache):
            raise TypeError(f"kv must be a ShardedKVCache, got {type(kv).__name__}")
        self.kv = kv
        # (real tokens, seq) during `prefill`; two lists (one entry a row) in `prefill_rows`
        self._chunk: tuple[int | list[int], int | list[int]] | None = None
        self._pending: tuple[int, Tensor] | None = None  # (layer, key) of the last `update`
        self.backend = "auto"  # block backend of prefill chunks (decode: config.decode_backend)
        super().__init__(layers=[_Layer(self, i) for i in range(kv.config.num_layers)])

    @classmethod
    def for_model(cls, model: Any, *, capacity: int, group: Group = None, max_seqs: int = 1,
                  page_size: int = 256, layout: str = "stripe", eviction: Any = None,
                  tiers: Any = None, **options: Any) -> "RingmemCache":
        """A cache shaped for `model` (layers, heads, head_dim, dtype, device from it);
        `eviction`: an optional `ringmem.eviction.EvictionPolicy`, `tiers` an optional
        `ringmem.cache.TierPolicy` (both act on the global layers only; sliding-window
        layers keep their window)."""
        cfg = cache_config(model, capacity=capacity, max_seqs=max_seqs, page_size=page_size,
                           layout=layout, **options)
        return cls(ShardedKVCache(cfg, group=group, eviction=eviction, tiers=tiers))

    def reset(self) -> None:
        super().reset()
        self._pending = None  # a forward that failed between `update` and attention
        for s in range(self.kv.config.max_seqs):
            self.kv.reset(s)

    def take_pending(self, layer: int, key: Tensor) -> bool:
        """Whether this cache's last `update` was for `layer` and returned `key` (the
        attention function's call to run); the pending call is cleared either way."""
        hit, self._pending = self._pending, None
        return hit is not None and hit[0] == layer and hit[1] is key

    # ------------------------------------------------------------------ attention
    def attention(self, layer: int, query: Tensor, key: Tensor, value: Tensor,
                  mask: Tensor | None, scaling: float | None, *, window: int = -1,
                  sinks: Tensor | None = None, softcap: float | None = None) -> Tensor:
        """Exact attention of the new tokens for `layer`; stores their K/V. Inputs in
        transformers' layout ([B, H, S, D]); returns [B, S, Hq, D]. `window`: the call's
        left window (-1: none), which must be the one the cache was built with."""
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        kv, n = self.kv, q.shape[1]
        built = kv.config.window(layer)
        if window != built:
            raise ValueError(f"layer {layer} attends with a left window of {window} (-1: "
                             f"none) but the cache keeps {built} for it: build the cache "
                             f"with RingmemCache.for_model(model) (config.layer_types, "
                             f"sliding_window)")
        extra = dict(softcap=softcap, sinks=sinks)
        if self._chunk is not None:  # `prefill`: this rank's shard of a chunk
            n_valid, seq = self._chunk
            return kv.prefill_chunk(layer, q, k, v, seq=seq, n_valid=n_valid,
                                    softmax_scale=scaling, backend=self.backend, **extra)
        if q.shape[0] != kv.config.max_seqs:
            raise ValueError(f"the model runs a batch of {q.shape[0]} rows but the cache holds "
                             f"max_seqs={kv.config.max_seqs} sequences (beam search and "
                             f"num_return_sequences multiply the batch)")
        valid = None if mask is None else mask[:, -n:].bool()
        if n == 1 and (valid is None or bool(valid.all())):
            return kv.decode(layer, q, k, v, softmax_scale=scaling, **extra)
        return self._replicated(layer, q, k, v, valid, scaling, extra)

    def _replicated(self, layer: int, q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None,
                    scaling: float | None, extra: dict[str, Any]) -> Tensor:
        """Every rank holds the same tokens: split them by the layout, attend, all-gather."""
        kv, out = self.kv, torch.zeros_like(q)
        gran = chunk_count(kv.config.layout, kv.world)
        for b in range(q.shape[0]):  # one cached sequence per batch row
            idx = (torch.arange(q.shape[1], device=q.device) if valid is None
                   else valid[b].nonzero().flatten())
            n = idx.numel()
            if n == 0:
                continue
            pad = -(-n // gran) * gran - n

            def part(x: Tensor, b: int = b, idx: Tensor = idx, pad: int = pad) -> Tensor:
                rows = x[b].index_select(0, idx)
                rows = torch.cat([rows, rows.new_zeros(pad, *rows.shape[1:])])
                return kv.shard_chunk(rows.unsqueeze(0))
            o = kv.prefill_chunk(layer, part(q), part(k), part(v), seq=b, n_valid=n,
                                 softmax_scale=scaling, backend=self.backend, **extra)
            full = unshard(o.contiguous(), 1, group=kv.group, layout=kv.config.layout)
            out[b].index_copy_(0, idx, full[0, :n].to(out.dtype))
        return out


@torch.no_grad()
def prefill(model: Any, input_ids: Tensor, cache: RingmemCache, *, seq: int = 0,
            chunk_size: int | None = None,
            progress: Callable[[int], None] | None = None,
            logits: bool = True) -> Tensor | None:
    """Run `model` over a prompt sharded across the ranks, chunk by chunk, filling `cache`.

    Every rank calls it with the same input_ids [1, S]. Each rank runs the model only on
    its shard of each chunk (the cache's layout, global position ids), so activation memory
    is bounded by chunk_size / world. Returns the logits of the last token [1, vocab] on
    every rank (None with logits=False: the LM head then runs on no token at all, which
    saves a vocabulary-sized product per chunk). `progress(n)` is called with the tokens
    done after each chunk.
    """
    if not isinstance(cache, RingmemCache):
        raise TypeError(f"cache must be a RingmemCache, got {type(cache).__name__}")
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be one sequence [1, S], got "
                         f"{tuple(getattr(input_ids, 'shape', ()))}")
    kv = cache.kv
    total, gran = input_ids.shape[1], chunk_count(kv.config.layout, kv.world)
    chunk_size = -(-total // gran) * gran if chunk_size is None else chunk_size
    if not isinstance(chunk_size, int) or chunk_size < gran or chunk_size % gran:
        raise ValueError(f"chunk_size must be a positive multiple of {gran} (layout "
                         f"{kv.config.layout!r} on {kv.world} ranks), got {chunk_size!r}")
    if total == 0:
        raise ValueError("input_ids is empty")
    last = None
    for start in range(0, total, chunk_size):
        ids = input_ids[:, start:start + chunk_size]
        n = ids.shape[1]
        c = -(-n // gran) * gran
        ids = torch.cat([ids, ids.new_zeros(1, c - n)], 1)  # pads sit after every real token
        local = kv.shard_chunk(ids)
        offset = kv.next_position(seq)  # this row's tokens so far, evicted ones included
        pos = positions(kv.config.layout, kv.rank, kv.world, c // kv.world).to(ids.device)
        final = start + chunk_size >= total
        mine = (pos == n - 1).nonzero().flatten()  # the prompt's last token, if I hold it
        keep = mine if (final and mine.numel()) else torch.tensor([0], device=ids.device)
        if not (logits and final):  # the LM head on no token: nobody reads these logits
            keep = keep[:0]
        cache._chunk = (n, seq)
        try:
            out = model(input_ids=local, position_ids=(offset + pos).unsqueeze(0),
                        use_cache=True, logits_to_keep=keep,
                        **cache_kwargs(model, cache)).logits
        finally:
            cache._chunk = None
        if final and logits:
            last = out[:, -1].float() * (1.0 if mine.numel() else 0.0)
        if progress is not None:
            progress(min(start + chunk_size, total))
    if kv.world > 1 and last is not None:  # one rank holds the last token: a sum hands it on
        dist.all_reduce(last, group=kv.group)
    for i, layer in enumerate(cache.layers):  # transformers' length: this row's tokens fed
        layer.seen = kv.next_position(seq, i)
    return last


@torch.no_grad()
def prefill_rows(model: Any, prompts: list[Tensor], cache: RingmemCache, seqs: list[int], *,
                 logits: bool = False) -> Tensor | None:
    """Prefill sequences `seqs` that hold the same cached tokens (a document forked to
    every row, `ShardedKVCache.fork`) with one prompt [1, n_i] each, in one model pass: the
    prompts are packed one after another into one chunk, sharded across the ranks; each
    attends to the shared prefix (one pass for all rows) and causally to itself only, at
    its own positions. The same result as `prefill` row by row, with one collective per
    layer and step instead of one per row. Returns each row's last-token logits
    [len(seqs), vocab] on every rank (None with logits=False: no LM head at all)."""
    if not isinstance(cache, RingmemCache):
        raise TypeError(f"cache must be a RingmemCache, got {type(cache).__name__}")
    if (not isinstance(prompts, list) or not isinstance(seqs, list) or not prompts
            or len(prompts) != len(seqs)):
        raise ValueError(f"prompts and seqs must be lists of the same positive length, got "
                         f"{type(prompts).__name__} and {type(seqs).__name__}")
    for i, p in enumerate(prompts):
        if not isinstance(p, Tensor) or p.dim() != 2 or p.shape[0] != 1 or p.shape[1] < 1:
            raise ValueError(f"prompts[{i}] must be one non-empty sequence [1, n], got "
                             f"{tuple(getattr(p, 'shape', ()))}")
    kv, lens = cache.kv, [p.shape[1] for p in prompts]
    total, gran = sum(lens), chunk_count(kv.config.layout, kv.world)
    c = -(-total // gran) * gran
    ids = torch.cat([*prompts, prompts[0].new_zeros(1, c - total)], 1)  # pads at the end
    dev = ids.device
    pos = torch.cat([kv.next_position(s) + torch.arange(n, device=dev)
                     for s, n in zip(seqs, lens)] + [torch.zeros(c - total, device=dev,
                                                                 dtype=torch.int64)])
    ends = torch.tensor(lens, device=dev).cumsum(0) - 1  # each row's last token
    local = positions(kv.config.layout, kv.rank, kv.world, c // kv.world).to(dev)
    keep = torch.isin(local, ends).nonzero().flatten() if logits else local[:0]
    cache._chunk = (lens, list(seqs))
    try:
        out = model(input_ids=kv.shard_chunk(ids), position_ids=kv.shard_chunk(pos[None]),
                    use_cache=True, logits_to_keep=keep, **cache_kwargs(model, cache)).logits
    finally:
        cache._chunk = None
    for i, layer in enumerate(cache.layers):  # transformers' length, as `prefill` sets it
        layer.seen = kv.next_position(seqs[-1], i)
    if not logits:
        return None
    last = out.new_zeros(len(seqs), out.shape[-1], dtype=torch.float32)
    row = torch.searchsorted(ends, local[keep])  # the rows whose last token I hold
    last[row] = out[0].float()
    if kv.world > 1:  # one rank holds each row's last token: a sum hands it on
        dist.all_reduce(last, group=kv.group)
    return last


def generate(model: Any, input_ids: Tensor, cache: RingmemCache, *,
             chunk_size: int | None = None, progress: Callable[[int], None] | None = None,
             **generate_kwargs: Any) -> Any:
    """`model.generate` with the prompt prefilled sharded across the ranks (all but its last
    token, which `generate` feeds itself), compressed to the eviction budget when the
    cache has a policy. Call it on every rank with the same arguments."""
    if (not isinstance(input_ids, Tensor) or input_ids.dim() != 2
            or input_ids.shape[0] != cache.kv.config.max_seqs):
        raise ValueError(f"input_ids must be [max_seqs={cache.kv.config.max_seqs}, S], got "
                         f"{tuple(getattr(input_ids, 'shape', ()))}")
    if generate_kwargs.get("attention_mask") is not None:
        raise ValueError("generate() prefills unpadded rows; for a padded batch call "
                         "model.generate(..., cache=cache) directly")
    for name in ("cache", "past_key_values"):
        if name in generate_kwargs:  # transformers would silently prefer one of the two
            raise TypeError(f"generate() passes `cache` to model.generate itself; got "
                            f"{name}={type(generate_kwargs[name]).__name__} as well")
    if cache.get_seq_length() != 0:
        raise ValueError(f"the cache already holds {cache.get_seq_length()} tokens; "
                         f"call cache.reset() first")
    if input_ids.shape[1] > 1:
        for b in range(input_ids.shape[0]):  # rows have one length: `seen` ends the same
            prefill(model, input_ids[b:b + 1, :-1], cache, seq=b, chunk_size=chunk_size,
                    progress=progress)
        if cache.kv.eviction is not None:  # prefill-time compression, one global budget
            cache.kv.compress()
    # an explicit all-ones mask: transformers would otherwise infer padding wherever the
    # prompt happens to contain the pad token, and shift positions the prefill did not
    return model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                          **cache_kwargs(model, cache), **generate_kwargs)


def cache_stats(cache: RingmemCache) -> dict[str, Any]:
    """Per-rank token counts and this rank's cache memory; `window_layers` and
    `window_saved_bytes`: the sliding-window layers and the memory their window-sized pools
    save on this rank against full-capacity ones. Counts are a full-attention layer's (a
    windowed layer holds only its window)."""
    kv, c = cache.kv, cache.kv.config
    lay = next((i for i in range(c.num_layers) if c.window(i) < 0), 0)
    seqs = range(c.max_seqs)
    return {"tokens_per_rank": [kv.rank_counts(s, lay) for s in seqs],
            "cached_tokens": [kv.seq_len(s, lay) for s in seqs],
            "memory_bytes": kv.memory_bytes(),
            "window_layers": [i for i in range(c.num_layers) if c.window(i) >= 0],
            "window_saved_bytes": kv.window_saved_bytes(),
            "layers": c.num_layers, "page_size": c.page_size,
            "ranks": kv.world, "capacity_per_rank": c.capacity,
            "utilisation": max(kv.seq_len(s, lay) for s in seqs) / (c.capacity * kv.world)}
