"""ShardedKVCache: each rank keeps the K/V of the tokens it owns; prefill and decode are exact.

* Prefill (`prefill_chunk`): a chunk of a prompt, sharded over the ranks by the layout,
  attends to the whole cached prefix (wherever it lives: schedule `q`, the chunk's queries
  travel) and causally to itself (ring attention), merged by lse; its K/V are then stored
  where the tokens live. Activation memory is bounded by the chunk, not the prompt.
* Decode (`decode`): the new token's q/k/v are the same on every rank. Each rank attends to
  its shard, the partials merge exactly across ranks, the new token's own term is added
  locally (every rank has it), and only then does the least-loaded rank store it.

Every rank keeps the same table of per-rank token counts, so placement and capacity checks
agree without communication; step counters ride along with the decode merge, so ranks that
disagree fail together instead of corrupting the cache.

Eviction (`eviction=EvictionPolicy(...)`, see `ringmem.eviction`): a coordinator keeps the
globally most important tokens under one budget per (layer, KV head). After a per-head
eviction, heads hold different tokens (`PagedStore` packs each head separately); decode
then attends per head, and prefill's prefix pass runs the ring once per KV head. Positions
keep counting from `next_position`, which `seq_len` (tokens held) no longer equals.

Memory tiers (`tiers=TierPolicy(...)`, see `tiers/pages.py`): evicted entries are demoted to host
and disk instead of dropped, and each decode step recalls, per rank, the demoted pages
whose Quest bound is highest for the query; attention is exact over hot + recalled
(+ pending) entries, merged by lse before the one cross-rank merge. `save` / `load`
checkpoint the whole cache, tiers and window state included (`checkpoint.py`).

Hybrid models (`config.windows`: sliding-window layers beside global ones, e.g. Gemma 3):
a windowed layer keeps only its window (`window.py`) and is excluded from eviction (never
scored, compressed or demoted: a token that leaves a window is never needed again, so it
is dropped, not tiered); the eviction budget and tiers act on the global layers only.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..agree import agree
from ..backends import Backend, get_backend
from ..comm import Group, group_rank_world
from ..eviction.actions import HardDrop
from ..eviction.budget import EvictionPolicy
from ..eviction.coordinator import Coordinator
from ..eviction.view import Dims
from ..layouts import positions
from .checks import check_index
from .config import CacheConfig
from .decode import decode_step
from .index import CacheIndex, WindowTracker
from .paged import PagedStore
from .prefill import prefill_chunk
from .tiers import Demote, TieredPages, TierPolicy
from .view import ShardedView

if TYPE_CHECKING:
    from ..eviction.actions import EvictionAction
    from ..eviction.records import EvictionRecord


class ShardedKVCache:
    """Per-layer paged K/V shards of up to `max_seqs` sequences across a process group.

    Parts: `stores` (this rank's `PagedStore` per layer), `index` (the replicated
    `CacheIndex`), `tiers` (`TieredPages` or None), `eviction` (the `Coordinator`, which
    sees the cache only through `view`), `decoder` (the backend of decode's local pass).
    """

    def __init__(self, config: CacheConfig, *, group: Group = None,
                 eviction: EvictionPolicy | None = None,
                 tiers: TierPolicy | None = None) -> None:
        _check_parts(config, eviction, tiers)
        c = self.config = config
        self.group = group
        self.rank, self.world = group_rank_world(group)
        self.device = torch.device(c.device)
        num_pages = -(-c.capacity // c.page_size)
        pages = [c.layer_pages(layer) for layer in range(c.num_layers)]
        self.stores = [PagedStore(num_pages=n, page_size=c.page_size,
                                  kv_heads=c.kv_heads, head_dim=c.head_dim,
                                  max_seqs=c.max_seqs, dtype=c.dtype, device=self.device)
                       for n in pages]
        self.index = CacheIndex(num_layers=c.num_layers, max_seqs=c.max_seqs,
                                world=self.world, kv_heads=c.kv_heads, page_size=c.page_size,
                                num_pages=num_pages, capacity=c.capacity, layer_pages=pages)
        self.windows = WindowTracker([c.window(i) for i in range(c.num_layers)], self.world,
                                     c.max_seqs)
        self.decoder = _decoder(c, self.device)
        self.tiers: TieredPages | None = None
        # per layer: (pinned flag, event) of a GPU decode step's cross-rank input check
        self.pending_checks: dict[int, tuple[Tensor, object]] = {}
        error = None
        try:  # directories and threads: may fail on one rank only
            if tiers is not None:
                self.tiers = TieredPages(tiers, c, self.rank, self.device)
        except (OSError, ValueError, TypeError) as e:
            error = e
        self.view = ShardedView(self.stores, self.index,
                                Dims(c.num_layers, c.max_seqs, c.q_heads, c.kv_heads,
                                     c.head_dim, windows=c.windows),
                                group=group, rank=self.rank, world=self.world,
                                device=self.device, action=self._action)
        self.eviction = None if eviction is None else Coordinator(self.view, eviction)
        # every rank built the same cache, or every rank raises (never a hang later)
        agree("ShardedKVCache", group, error,
              dims=(c.num_layers, c.q_heads, c.kv_heads, c.head_dim),
              capacity=(c.capacity, c.page_size, c.max_seqs), dtype=c.dtype,
              layout=c.layout, merge=c.merge, windows=c.windows,
              prefill_schedule=c.prefill_schedule,
              **{"eviction policy": None if eviction is None else eviction.signature(),
                 "tiers (on, recall)": None if tiers is None else tiers.signature()})

    def _action(self) -> "EvictionAction":
        """Where evicted entries go: the tiers when there are any, else the policy's."""
        if self.tiers is not None:
            return Demote(self.tiers)
        assert self.eviction is not None
        return self.eviction.policy.action

    # ---------------------------------------------------------------- counts
    def seq_len(self, seq: int = 0, layer: int = 0) -> int:
        """Global number of cached tokens of `seq` in `layer` (per rank, slots in use: the
        most any KV head holds there)."""
        return self.index.held(self._layer(layer), self._seq(seq))

    def next_position(self, seq: int = 0, layer: int = 0) -> int:
        """Global position of the next token of `seq` (tokens ever added, evicted included)."""
        return self.view.next_position(self._seq(seq), self._layer(layer))

    def head_counts_of(self, seq: int = 0, layer: int = 0) -> list[list[int]]:
        """[rank][KV head] tokens held (they differ across heads after per-head eviction)."""
        return self.view.head_counts_of(self._seq(seq), self._layer(layer))

    def rank_counts(self, seq: int = 0, layer: int = 0) -> list[int]:
        """Per rank: slots in use by `seq` in `layer`."""
        return self.view.rank_counts(self._seq(seq), self._layer(layer))

    def _layer(self, layer: int) -> int:
        return check_index("layer", layer, self.config.num_layers)

    def _seq(self, seq: int) -> int:
        return check_index("seq", seq, self.config.max_seqs)

    # ---------------------------------------------------------------- prefill / decode
    def prefill_chunk(self, layer: int, q: Tensor, k: Tensor, v: Tensor, *,
                      seq: int | list[int] = 0, n_valid: int | list[int] | None = None,
                      softmax_scale: float | None = None, backend: str = "auto",
                      softcap: float | None = None, sinks: Tensor | None = None) -> Tensor:
        """Attend this rank's shard of the next prompt chunk, then cache its K/V.

        q [1, C/P, Hq, D], k/v [1, C/P, Hkv, D]: this rank's part of a chunk of C tokens, split
        by `config.layout` (use `shard_chunk`). The chunk follows the `seq_len` tokens already
        cached. `n_valid`: real tokens in the chunk (the rest is padding at its end: not
        cached, and no real token attends to it). `softcap`: logits become softcap *
        tanh(logits / softcap); `sinks` [Hq]: one more logit per head in every row's softmax
        denominator. A windowed layer (`config.windows`) sees only its window and keeps
        only the last `left` tokens. Returns out [1, C/P, Hq, D].

        Several sequences at once: `seq` a list of sequences holding the same cached tokens
        (forked from one document), `n_valid` their token counts; the chunk holds their
        tokens one after another (padding after the last). Each row attends to the shared
        prefix (one pass for all) and causally to its own tokens, at positions following
        the prefix, and is cached in its own sequence.
        """
        return prefill_chunk(self, layer, q, k, v, seq=seq, n_valid=n_valid,
                             softmax_scale=softmax_scale, backend=backend, softcap=softcap,
                             sinks=sinks)

    def shard_chunk(self, x: Tensor, dim: int = 1) -> Tensor:
        """This rank's part of a full chunk tensor, split as `prefill_chunk` expects."""
        n = x.shape[dim]
        if n % self.world:
            raise ValueError(f"chunk length {n} must be a multiple of the world size "
                             f"{self.world} (pad it and pass n_valid)")
        idx = positions(self.config.layout, self.rank, self.world, n // self.world)
        return x.index_select(dim, idx.to(x.device))

    def decode(self, layer: int, q: Tensor, k: Tensor, v: Tensor, *,
               softmax_scale: float | None = None, softcap: float | None = None,
               sinks: Tensor | None = None) -> Tensor:
        """One decode step for every sequence: q [B, 1, Hq, D], k/v [B, 1, Hkv, D], the same
        on every rank (B = max_seqs). Returns out [B, 1, Hq, D]: exact attention of each new
        query over its sequence's cached tokens plus the new token, which is then cached on
        the least-loaded rank (pipeline: `decode.py`).

        Errors (bad input, full cache, ranks disagreeing on the step, a full or damaged
        tier store) are raised on every rank after the one collective of the step, so no
        rank is left waiting in it. With tiers, each rank also attends its pending and
        recalled demoted entries before that merge. `softcap` and `sinks` as in
        `prefill_chunk`; a windowed layer attends to its window and then drops the token
        that leaves it.
        """
        return decode_step(self, layer, q, k, v, softmax_scale, softcap, sinks)

    # ---------------------------------------------------------------- low level
    def extend_local(self, layer: int, seq: int, k: Tensor, v: Tensor, pos: Tensor) -> None:
        """Append tokens to *this rank's* shard only (k, v [n, Hkv, D], pos [n]); every rank
        must then call `sync()` so all ranks see the new counts. Not for windowed layers
        (their replicated positions would be wrong)."""
        if self.windows.windowed(self._layer(layer)):
            raise ValueError(f"layer {layer} has a sliding window (config.windows): "
                             f"extend_local cannot place its tokens; use prefill_chunk")
        self.stores[self._layer(layer)].append(self._seq(seq), k, v, pos)

    def sync(self) -> None:
        """Refresh every rank's tables of per-rank (per-head) token counts and each
        sequence's next position (past every position held anywhere) (collective)."""
        self.index.sync(self.stores, self.group, self.view.wire())

    def fork(self, src: int, dsts: int | list[int]) -> None:
        """Each sequence of `dsts` (empty) becomes a copy of `src`, e.g. one question each
        about a prefilled document (collective: every rank calls it alike). Full pages of
        global layers are shared, held once per rank and reference counted; a partly filled
        last page, windowed layers' pages (they drop tokens as they slide) and the pages of
        a cache whose scorer accumulates scores per sequence (H2O, TOVA, ...) are copied.
        Writes never touch a shared page (`PagedStore`); demoted tier pages are copied.
        Eviction state (the observation window) is inherited: compressing a fork after its
        question is prefilled is per-question eviction; compressing `src` before the fork is
        question-agnostic."""
        error, short, need, dst = None, 0, 0, []
        try:
            src = self._seq(src)
            dst = [dsts] if isinstance(dsts, int) and not isinstance(dsts, bool) else dsts
            if not isinstance(dst, (list, tuple)):
                raise TypeError(f"dsts must be an int or a list of ints, got {dsts!r}")
            dst = [self._seq(d) for d in dst]
            if src in dst or len(set(dst)) != len(dst):
                raise ValueError(f"dsts must be distinct sequences other than src={src}, "
                                 f"got {dsts!r}")
            busy = [d for d in dst if any(self.index.seen[lay][d]
                                          for lay in range(self.config.num_layers))]
            if busy:
                raise ValueError(f"fork: sequence(s) {busy} are not empty: reset them first")
            for layer, st in enumerate(self.stores):
                need = len(dst) * st.fork_pages(src, self._shares(layer, src))
                short = max(short, need - st.free_pages)
        except (TypeError, ValueError) as e:
            error = e
        agree("fork", self.group, error, src=src if error is None else -1,
              dsts=tuple(dst) if error is None else (), **{"pages short": max(0, short)},
              explain={"pages short": "KV cache capacity exceeded on some rank(s): pages "
                                      "each rank lacks to copy the last pages"})
        if short > 0:
            raise ValueError(f"KV cache capacity exceeded: fork of sequence {src} needs "
                             f"{short} more page(s) on rank {self.rank}")
        for d in dst:
            for layer, st in enumerate(self.stores):
                st.fork(src, d, self._shares(layer, src))
            self.index.fork(src, d)
            self.windows.fork(src, d)
            if self.eviction is not None:
                self.eviction.fork(src, d)
            if self.tiers is not None:
                self.tiers.fork(src, d)

    def _shares(self, layer: int, src: int) -> bool:
        """Whether a fork of `src` shares `layer`'s full pages (see `fork`)."""
        accumulates = self.eviction is not None and self.eviction.wants_logits
        return (self.config.window(layer) < 0 and not accumulates
                and not self.index.split[layer][src])

    def pages_in_use(self) -> list[int]:
        """Per layer: distinct pages this rank's sequences hold (a shared page once)."""
        return [st.pages_in_use for st in self.stores]

    def reset(self, seq: int) -> None:
        seq = self._seq(seq)
        for store in self.stores:
            store.reset(seq)
        self.index.reset(seq)
        self.windows.reset(seq)
        if self.eviction is not None:
            self.eviction.reset(seq)
        if self.tiers is not None:  # the only way demoted pages are deleted
            self.tiers.reset(seq)

    def compress(self, layer: int | None = None, seq: int | None = None
                 ) -> "list[EvictionRecord]":
        """Enforce the eviction budget now on `layer` (default: every layer) and `seq`
        (default: every sequence), e.g. after a chunked prefill. Collective: every rank
        calls it with the same arguments (a mismatch raises on every rank). Returns what
        each compression did (layers and sequences within budget are skipped). Under
        allocation "global" the layers share one pool: `layer` must be None. Windowed
        layers are never compressed: layer=None skips them, naming one raises ValueError
        (on every rank). With tiers, the evicted entries are demoted before it returns."""
        if self.eviction is None:  # replicated: the constructor checked every rank's policy
            raise ValueError("this cache has no eviction policy (pass eviction=... to "
                             "ShardedKVCache)")
        error = None
        try:
            layers = (list(range(self.config.num_layers)) if layer is None
                      else [self._layer(layer)])
            seqs = list(range(self.config.max_seqs)) if seq is None else [self._seq(seq)]
            if layer is not None and self.windows.windowed(layers[0]):
                raise ValueError(f"layer {layer} has a sliding window (config.windows[{layer}]"
                                 f"={self.config.window(layer)}): it keeps only its window "
                                 f"and is never compressed; pass a global layer or None")
            if self.eviction.policy.allocation == "global" and layer is not None:
                raise ValueError(f"allocation='global' pools the budget over every layer: "
                                 f"compress them together (layer=None), got layer={layer!r}")
        except (TypeError, ValueError) as e:
            error, layers, seqs = e, [], []
        agree("compress", self.group, error,
              layer=layer if isinstance(layer, int) else repr(layer),
              seq=seq if isinstance(seq, int) else repr(seq))
        out = self.eviction.compress_all(layers, seqs)
        if self.tiers is not None:  # demote now; a full tier store raises on every rank
            try:
                for lay in layers:
                    for s in seqs:
                        self.tiers.flush(lay, s)
            except (ValueError, OSError) as e:
                error = e
            agree("compress (demotion)", self.group, error)
        return out

    def tier_stats(self) -> dict:
        """This rank's tier usage (`TieredPages.stats`): pages and bytes per tier, pending
        entries, summary bytes, recall counters. Empty without tiers."""
        return {} if self.tiers is None else self.tiers.stats()

    def close(self) -> None:
        """Stop the tiers' transfer worker and delete their pages and files."""
        if self.tiers is not None:
            self.tiers.close()

    def save(self, root: str | Path, *, model_id: str, fsync: bool = True) -> Path:
        """Checkpoint every rank's shard as a new generation of `root`, committed for all
        ranks at once (collective; see `checkpoint.py`): hot pages, demoted pages,
        bookkeeping, eviction state, the windowed layers' positions. A failure on any rank
        raises on every rank and keeps the previous checkpoint. Returns this rank's shard
        manifest path."""
        from .checkpoint import save_cache
        return save_cache(self, root, model_id=model_id, fsync=fsync)

    @classmethod
    def load(cls, root: str | Path, config: CacheConfig, *, model_id: str,
             group: Group = None, eviction: EvictionPolicy | None = None,
             tiers: TierPolicy | None = None) -> "ShardedKVCache":
        """A cache resumed from `save` (collective). model id, layout, world size, dtype,
        dims, page size, capacity, windows, eviction policy and the files are all checked;
        any mismatch or damage raises on every rank."""
        from .checkpoint import load_cache
        cache = cls(config, group=group, eviction=eviction, tiers=tiers)
        try:
            load_cache(cache, root, model_id=model_id)
        except BaseException:
            cache.close()  # its tier worker and scratch directory
            raise
        return cache

    def memory_bytes(self) -> int:
        """Bytes this rank's cache pools take (K, V and metadata)."""
        return sum(t.numel() * t.element_size() for s in self.stores
                   for t in (s.k, s.v, s.pos, s.score))

    def window_saved_bytes(self) -> int:
        """Bytes this rank saves because windowed layers' pools hold only their window
        (against full-capacity pools for every layer)."""
        full, saved = self.index.num_pages, 0
        for s in self.stores:
            per_page = sum(t.numel() * t.element_size()
                           for t in (s.k, s.v, s.pos, s.score)) // s.num_pages
            saved += (full - s.num_pages) * per_page
        return saved


def _check_parts(config: object, eviction: object, tiers: object) -> None:
    if not isinstance(config, CacheConfig):
        raise TypeError(f"config must be a CacheConfig, got {type(config).__name__}")
    if eviction is not None and not isinstance(eviction, EvictionPolicy):
        raise TypeError(f"eviction must be an EvictionPolicy or None, got "
                        f"{type(eviction).__name__}")
    if tiers is not None and not isinstance(tiers, TierPolicy):
        raise TypeError(f"tiers must be a TierPolicy or None, got {type(tiers).__name__}")
    if tiers is not None and eviction is not None and not isinstance(eviction.action, HardDrop):
        raise ValueError(f"with tiers= the cache demotes evicted entries itself; "
                         f"eviction.action must be the default HardDrop, got "
                         f"{type(eviction.action).__name__}")


def _decoder(c: CacheConfig, device: torch.device) -> Backend:
    """The backend of decode's local pass. "paged" (the default) reads the pages in place:
    Triton's run-list kernel on CUDA (one launch per sequence, whatever the page layout),
    the compiled kernel on CPU (`backends/cpu_backend.py`, which falls back to the torch
    pass itself where it cannot be built), else the torch backend's pass."""
    if c.decode_backend not in ("paged", "auto"):  # "auto": the fastest, as for blocks
        return get_backend(c.decode_backend, device, c.dtype, c.head_dim)
    for name in {"cuda": ("triton",), "cpu": ("cpu",)}.get(device.type, ()):
        try:
            return get_backend(name, device, c.dtype, c.head_dim)
        except ValueError:  # no triton, or a dtype / head dim its kernels do not take
            pass
    return get_backend("torch", device, c.dtype, c.head_dim)
