"""One document, its questions, every rank: the work of `ringmem infer` per document.

`Documents.answer(cfg, text, questions)` tokenizes the document and questions
(`hf_questions.split_prompt`), sizes a cache for them, finds the document's cache on disk
(`doc_cache`, content-keyed: `ringmem.jobs`) or prefills it sharded across the ranks (and
saves it), then answers the questions in batches of `max_batch` from that one prefill
(`hf_questions.answer_questions`), yielding one record per answer.

Cache size, per rank and layer, in tokens: the document's share (ceil(S / P)); with
question-agnostic eviction ("document"), compressed after every prefill chunk, the budget's
share instead (x1.1: rebalancing keeps every rank within 1.1x the mean; x the layers and
heads a "global" or "adaptive" allocation pools into one) plus one chunk's share, once, or
once per row when the KV heads keep different tokens (forks then copy it); with
per-question eviction the whole document plus each row's compressed copy. Then per row its
question and answer tokens (at most QUESTION_TOKENS + max_new_tokens, spread over the ranks)
after its copy of the document's last page, in whole pages; then a page of rounding. Windowed
layers need each row's window: the size is at least that.
"""
from __future__ import annotations

import dataclasses
import math
import resource
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..config import InferConfig
from ..layouts import chunk_count

QUESTION_TOKENS = 256
"""The longest question (with its chat template or answer prefix), in tokens."""
MAX_BATCH = 16
"""Questions decoded together; more are answered in further batches of the same prefill
(reloaded from the document cache when it is on, else prefilled again)."""
REBALANCE = 1.1
"""After each compression the ranks are rebalanced until none holds more than this times
the mean (or one token over it): the pools are sized for that."""
OPTIONS: dict[str, Any] = {"max_new_tokens": int, "eviction": (str, type(None)),
                           "budget": float, "allocation": str, "compress": str,
                           "snapkv_kernel": int, "answer_prefix": str, "one_line": bool,
                           "streaming": bool}
"""Per-job options of a jobs file (`InferConfig` fields)."""


def prompt_ids(cfg: InferConfig, tok: Any, text: str, questions: list[str],
               prefixes: list[str | None] | None = None
               ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(document ids [1, S], question ids [1, Q_i]), checked against max_context;
    `prefixes`: each question's own answer prefix (None: the config's for a base model,
    none for a chat model)."""
    from ..integrations.hf_questions import split_prompt
    doc, qs = split_prompt(tok, text, questions, answer_prefix=cfg.answer_prefix,
                           prefixes=prefixes or None)
    longest = max(q.shape[1] for q in qs)
    if longest > QUESTION_TOKENS:
        raise ValueError(f"a question is {longest} tokens with its prompt, more than "
                         f"{QUESTION_TOKENS}")
    total = doc.shape[1] + longest + cfg.max_new_tokens
    if total > cfg.max_context:
        raise ValueError(f"the prompt ({doc.shape[1] + longest} tokens: document "
                         f"{doc.shape[1]}, longest question {longest}) plus "
                         f"max_new_tokens={cfg.max_new_tokens} is longer than "
                         f"max_context={cfg.max_context}")
    return doc, qs


class Documents:
    """The loaded model and tokenizer on this rank, and what every document needs."""

    def __init__(self, cfg: InferConfig, model: Any, tok: Any, *, world: int, rank: int,
                 revision: str) -> None:
        self.cfg, self.model, self.tok = cfg, model, tok
        self.world, self.rank, self.revision = world, rank, revision
        self.device = next(model.parameters()).device
        gran = chunk_count(cfg.layout, world)
        self.chunk = -(-cfg.chunk_size // gran) * gran  # the layout splits chunks evenly
        self.store = None
        self._newlines: frozenset[int] | None = None
        if cfg.doc_cache:
            from ..jobs.store import DocCacheStore
            self.store = DocCacheStore(cfg.doc_cache_dir,
                                       max_bytes=int(cfg.doc_cache_gb * 2**30))

    def with_options(self, options: dict[str, Any]) -> InferConfig:
        """The run's config with a job's options (checked like the config's own)."""
        return dataclasses.replace(self.cfg, **options)

    # ---------------------------------------------------------------- the cache
    def policies(self, cfg: InferConfig) -> tuple[Any, Any]:
        """(EvictionPolicy or None, TierPolicy or None) of `cfg`."""
        if cfg.eviction is None:
            return None, None
        from ..cache import TierPolicy
        from ..eviction import EvictionPolicy, SnapKV, make_scorer
        scorer = (SnapKV(cfg.snapkv_kernel) if cfg.eviction == "snapkv"
                  else make_scorer(cfg.eviction))
        policy = EvictionPolicy(scorer=scorer, budget=float(cfg.budget),
                                decode_every=cfg.decode_every, allocation=cfg.allocation,
                                prefill="chunk" if cfg.compress == "document"
                                and cfg.streaming and not _reconstructs(scorer) else "after",
                                rebalance=REBALANCE if self.world > 1 else 0.0)
        tiers = None
        if cfg.tier_host_pages or cfg.tier_disk_pages:
            tiers = TierPolicy(host_pages=cfg.tier_host_pages, disk_pages=cfg.tier_disk_pages,
                               disk_dir=cfg.tier_dir, recall=cfg.tier_recall)
        return policy, tiers

    def capacity(self, cfg: InferConfig, doc_len: int, rows: int, policy: Any) -> int:
        """Tokens per rank per layer (see the module doc)."""
        p, ps, c = self.world, cfg.page_size, self.model.config
        kvh = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        doc = -(-doc_len // p)
        if policy is not None:
            # the most one (layer, KV head) may keep: "adaptive" pools a layer's heads,
            # "global" every global layer's heads
            glob = sum(w < 0 for w in _windows(c))
            pooled = {"global": glob * kvh, "adaptive": kvh}.get(cfg.allocation, 1)
            share = math.ceil(REBALANCE * pooled * policy.tokens(doc_len) / p) + 2
            heads_differ = kvh > 1 and policy.granularity == "head"
            if cfg.compress == "document" and _reconstructs(policy.scorer):
                # the whole document, then the reconstruction's chunk in its scratch row
                doc += -(-(self.chunk + 64) // p) + rows * min(doc, share)
            elif cfg.compress == "document" and not cfg.streaming:  # whole, then compressed
                doc += rows * min(doc, share)
            elif cfg.compress == "document":  # forks share it, unless its heads differ
                doc = min(doc, share) * (rows if heads_differ else 1) + -(-self.chunk // p)
            else:  # the whole document until every row holds its own compressed copy
                doc += rows * min(doc, share)
        # each row's question and answer tokens after its copy of the document's last page
        mine = -(-(QUESTION_TOKENS + cfg.max_new_tokens) // p) + 2
        per_row = ps * (1 + -(-mine // ps))
        cap = doc + rows * per_row + ps
        left = max(_windows(c), default=-1)  # windowed layers: every row its own window
        return max(cap, rows * (-(-left // ps) + 1) * ps) if left > 0 else cap

    def build(self, cfg: InferConfig, doc_len: int, rows: int) -> Any:
        """An empty `RingmemCache` for `rows` questions about a `doc_len`-token document."""
        from ..integrations import hf_cache
        policy, tiers = self.policies(cfg)
        options = {"decode_backend": cfg.backend} if cfg.backend in ("torch", "sdpa",
                                                                     "triton") else {}
        if policy is not None and _reconstructs(policy.scorer):
            rows = max(rows, 2)  # row 1 is the reconstruction's scratch before the questions
        cache = hf_cache.RingmemCache.for_model(
            self.model, capacity=self.capacity(cfg, doc_len, rows, policy), max_seqs=rows,
            page_size=cfg.page_size, layout=cfg.layout, eviction=policy, tiers=tiers,
            **options)
        cache.backend = cfg.backend
        return cache

    def key(self, cfg: InferConfig, doc: torch.Tensor, cache: Any) -> str:
        """The document cache's content key: tokens, model, layout, ranks, dtype, policy,
        and what shapes the saved pools (capacity, rows, page size, chunk, windows)."""
        from ..jobs.keys import content_key
        kv = cache.kv
        policy = None if kv.eviction is None else list(kv.eviction.policy.signature())
        c = kv.config
        return content_key(token_ids=doc, model_id=cfg.model, model_revision=self.revision,
                           layout=c.layout, world_size=self.world, dtype=c.dtype,
                           policy=[policy, cfg.compress if policy else None],
                           extra={"capacity": c.capacity, "rows": c.max_seqs,
                                  "page_size": c.page_size, "chunk": self.chunk,
                                  "windows": list(c.windows),
                                  "tiers": None if kv.tiers is None else
                                  [cfg.tier_host_pages, cfg.tier_disk_pages, cfg.tier_recall]})

    def _document(self, cfg: InferConfig, doc: torch.Tensor, rows: int,
                  progress: Callable[[int], None] | None) -> tuple[Any, str, float]:
        """(a cache with the document in sequence 0, "hit"/"miss"/"off", seconds)."""
        from ..integrations import hf_cache
        t0 = time.perf_counter()
        cache = self.build(cfg, doc.shape[1], rows)
        kv, how = cache.kv, "off"
        if self.store is not None:
            from ..jobs.collective import load_or_none, save_entry
            key = self.key(cfg, doc, cache)
            found = load_or_none(self.store, key, kv.config, model_id=cfg.model,
                                 group=kv.group, eviction=kv.eviction and kv.eviction.policy,
                                 tiers=self.policies(cfg)[1])
            if found is not None:
                kv.close()
                cache = hf_cache.RingmemCache(found)  # its layers start at the document's end
                cache.backend = cfg.backend
                if progress is not None:
                    progress(doc.shape[1])
                return cache, "hit", time.perf_counter() - t0
            how = "miss"
        hf_cache.prefill(self.model, doc.to(self.device), cache, seq=0, chunk_size=self.chunk,
                         progress=progress, logits=False)
        if kv.eviction is not None and cfg.compress == "document":
            if _reconstructs(kv.eviction.policy.scorer):  # scored by repeating the document
                from ..integrations.hf_questions import reconstruct, repeat_prompts
                reconstruct(self.model, cache, doc.to(self.device), repeat_prompts(self.tok),
                            scratch=1, chunk_size=self.chunk)
            kv.compress(seq=0)
        if self.store is not None:
            save_entry(self.store, key, kv, model_id=cfg.model,
                       meta={"tokens": int(doc.shape[1]), "fields": {
                           "model": cfg.model, "world": self.world, "layout": cfg.layout,
                           "dtype": cfg.dtype, "eviction": cfg.eviction,
                           "budget": cfg.budget if cfg.eviction else None}})
        return cache, how, time.perf_counter() - t0

    # ---------------------------------------------------------------- answers
    def answer(self, cfg: InferConfig, text: str, questions: list[str], *,
               progress: Callable[[int], None] | None = None,
               prefixes: list[str | None] | None = None) -> Iterator[dict[str, Any]]:
        """One record per question as it is answered (the same on every rank);
        `prefixes`: each question's own answer prefix (base models; None: the config's)."""
        from ..integrations.hf_questions import answer_questions
        doc, qs = prompt_ids(cfg, self.tok, text, questions, prefixes)
        rows = min(len(qs), MAX_BATCH)
        one_line = cfg.one_line and not getattr(self.tok, "chat_template", None)
        for first in range(0, len(qs), rows):
            batch = qs[first:first + rows]
            cache, how, doc_s = self._document(cfg, doc, rows, progress)
            try:
                for a in answer_questions(self.model, cache, doc, [q.to(self.device)
                                                                   for q in batch],
                                          max_new_tokens=cfg.max_new_tokens,
                                          eos_token_id=self.eos(),
                                          chunk_size=self.chunk, prefilled=True,
                                          stop_token_ids=self.newlines() if one_line
                                          else (),
                                          compress="question" if cache.kv.eviction
                                          is not None and cfg.compress == "question"
                                          else None):
                    said = self.tok.decode(a.tokens, skip_special_tokens=True).strip()
                    yield {"question_index": first + a.index,
                           "answer": said.split("\n")[0].strip() if one_line else said,
                           "new_tokens": len(a.tokens), "prompt_tokens": a.prompt_tokens,
                           "document_tokens": int(doc.shape[1]), "doc_cache": how,
                           "document_s": round(doc_s, 3),
                           "first_token_s": round(doc_s + a.first_token_s, 3),
                           "latency_s": round(doc_s + a.seconds, 3),
                           "question_prefill_s": round(a.question_prefill_s, 3),
                           "batch": rows, "cache": self.stats(cache)}
            finally:
                cache.kv.close()

    def newlines(self) -> frozenset[int]:
        """The token ids whose text holds a newline (one-line answers end after one)."""
        if self._newlines is None:
            vocab = self.tok.get_vocab()  # a newline's spellings, then the decoded check
            maybe = [i for t, i in vocab.items() if "\n" in t or "\u010a" in t
                     or t == "<0x0A>"]
            self._newlines = frozenset(i for i in maybe if "\n" in self.tok.decode([i]))
        return self._newlines

    def eos(self) -> list[int]:
        """End-of-sequence ids: the tokenizer's and the model's generation config's (a
        chat model's end-of-turn token may be listed only there)."""
        ids = set()
        for x in (self.tok.eos_token_id,
                  getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)):
            ids |= {x} if isinstance(x, int) else set(x or ())
        return sorted(ids)

    def stats(self, cache: Any) -> dict[str, Any]:
        """This rank's cache bytes per tier and peak memory (a rank-0 view in records)."""
        kv = cache.kv
        tiers = kv.tier_stats()
        page_bytes = kv.memory_bytes() // max(1, sum(s.num_pages for s in kv.stores))
        return {"pool_bytes": kv.memory_bytes(),
                "pages_in_use_bytes": sum(kv.pages_in_use()) * page_bytes,
                "host_tier_bytes": int(tiers.get("host_bytes", 0)),
                "disk_tier_bytes": int(tiers.get("disk_bytes", 0)),
                "pending_bytes": int(tiers.get("pending_bytes", 0)),
                "tokens_per_rank": kv.rank_counts(0, _global_layer(kv)),
                "peak_rss_bytes": peak_bytes()}


def _reconstructs(scorer: Any) -> bool:
    return bool(getattr(scorer, "reconstructs", False))


def _windows(model_config: Any) -> list[int]:
    from ..integrations.hf_masks import layer_windows
    return list(layer_windows(model_config))


def _global_layer(kv: Any) -> int:
    c = kv.config
    return next((i for i in range(c.num_layers) if c.window(i) < 0), 0)


def peak_bytes() -> int:
    """This process's peak memory: CUDA's allocator peak on a GPU, else the peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
