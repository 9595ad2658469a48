"""Many questions about one document from one prefill, answered as one batch.

The document is prefilled once, sharded across the ranks, into sequence 0 of a
`RingmemCache`; the other sequences are forked from it (`ShardedKVCache.fork`: the
document's pages are held once per rank, reference counted); the questions are then
prefilled together, each into its own sequence after the document's tokens (packed into
one chunk, `prefill_rows`: one pass over the shared document for all of them), and all
questions decode together, one batch row each, greedily. Each answer is yielded as
soon as its row ends (end-of-sequence token or `max_new_tokens`).

Eviction of the shared document, two ways (`compress`):
* "document" (question-agnostic): the document is compressed before any question is
  seen (the policy's scores come from the document's own queries), once, and every
  question reads that one compressed copy, still shared.
* "question" (per question): each sequence is compressed after its question is read, on
  its own view of the shared pages (SnapKV-style scorers then see the question in their
  observation window); the survivors go to private pages, so each question holds its own
  compressed copy and the full document is held until the last question is compressed.

Prompts (`split_prompt`): a model with a chat template gets the document and question in
one user turn, cut where the document ends; a base model (no template) gets a completion
prompt, the document, then "Question: ...\\nAnswer:" (`answer_prefix`), as RULER prompts
base models. A question's own answer prefix opens the answer of either kind.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator
from contextlib import nullcontext
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .hf_cache import RingmemCache, cache_kwargs, prefill, prefill_rows
from .hf_vocab import greedy, split_head

COMPRESS = ("document", "question")
REPEAT = "\n\nRepeat the previous context exactly."
"""KVzip's prompt before the first chunk's repeat (`repeat_prompts`)."""
RESUME = "Repeat the part of the previous context exactly, starting with"
"""KVzip's prompt before a later chunk's repeat, followed by the previous chunk's tail."""


class Answer(NamedTuple):
    """One question's answer (the same on every rank)."""
    index: int
    """The question's index in the call's list."""
    tokens: list[int]
    """The generated token ids (the end-of-sequence token excluded)."""
    question_prefill_s: float
    """Seconds to prefill every question's tokens (after the document's; they are
    prefilled together)."""
    seconds: float
    """Seconds from the call's start (document prefill included) to this answer's end."""
    prompt_tokens: int
    """Document plus question tokens."""
    first_token_s: float = 0.0
    """Seconds from the call's start to the first answer token (every row's at once)."""
    logits: tuple[Tensor, ...] = ()
    """With keep_logits: the float32 logits [vocab] that chose each token."""


def _packs(lens: list[int], chunk_size: int | None) -> list[list[int]]:
    """Rows with tokens to prefill, in order, grouped so each group's tokens fit one chunk
    (a longer row alone)."""
    packs: list[list[int]] = []
    used = 0
    for s, n in enumerate(lens):
        if n == 0:
            continue
        if packs and (chunk_size is None or used + n <= chunk_size):
            packs[-1].append(s)
            used += n
        else:
            packs.append([s])
            used = n
    return packs


def split_prompt(tok: Any, document: str, questions: list[str], *,
                 answer_prefix: str = "Answer:",
                 prefixes: list[str | None] | None = None) -> tuple[Tensor, list[Tensor]]:
    """(document ids [1, S], each question's ids [1, Q_i]) such that the document's ids then
    a question's are that question's prompt: a chat turn cut where the document ends (models
    with a chat template), or the completion "<document>\n\nQuestion: <question>\n
    <answer_prefix>" (base models). `prefixes`: each question's own answer prefix (None:
    the default), which opens the assistant's turn of a chat model as it does a base
    model's answer (as RULER prompts both); by default a chat model gets none, a base
    model `answer_prefix`. The document is tokenized once."""
    def ids(text: str, special: bool = False) -> Tensor:
        return tok(text, add_special_tokens=special, return_tensors="pt")["input_ids"]
    own = [None] * len(questions) if prefixes is None else list(prefixes)
    if len(own) != len(questions):
        raise ValueError(f"prefixes must give one per question ({len(questions)}), "
                         f"got {len(own)}")
    if getattr(tok, "chat_template", None):
        texts = [tok.apply_chat_template([{"role": "user", "content": f"{document}\n\n{q}"}],
                                         add_generation_prompt=True, tokenize=False) + (p or "")
                 for q, p in zip(questions, own)]
        cut = texts[0].index(document) + len(document)  # the template's text before it
        return ids(texts[0][:cut]), [ids(t[cut:]) for t in texts]
    # the BOS token, if any, opens the document
    pre = [answer_prefix if p is None else p for p in own]
    return ids(document, True), [ids(f"\n\nQuestion: {q}\n{p}") for q, p in zip(questions, pre)]


def repeat_prompts(tok: Any, tail: int = 8) -> Callable[[Tensor | None], Tensor]:
    """KVzip's repeat prompts, for `reconstruct`: given the previous chunk's ids (None
    before the first chunk), the ids [1, R] that precede a chunk's repeat. The first chunk
    gets "Repeat the previous context exactly.", a later one `RESUME` and the previous
    chunk's last `tail` tokens, so the model resumes where it stopped; a chat model reads
    the prompt as its user's turn and repeats in its own turn, a base model after a
    newline."""
    def ids(text: str) -> Tensor:
        return tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if getattr(tok, "chat_template", None):  # the template's text after a user's turn
        mark = "\x00" * 4
        turn = tok.apply_chat_template([{"role": "user", "content": "x" + mark}],
                                       add_generation_prompt=True, tokenize=False)
        after = ids(turn.split(mark, 1)[1])
    else:
        after = ids("\n")
    first = ids(REPEAT)
    resume = ids("\n\n" + RESUME)

    def prompt(prev: Tensor | None) -> Tensor:
        if prev is None:
            return torch.cat([first, after], 1)
        return torch.cat([resume, prev[:, -tail:].cpu(), after], 1)
    return prompt


@torch.no_grad()
def reconstruct(model: Any, cache: RingmemCache, document: Tensor,
                repeat: Tensor | Callable[[Tensor | None], Tensor], *,
                seq: int = 0, scratch: int = 1, chunk_size: int | None = None) -> None:
    """Score the document cached in `seq` by context reconstruction (the KVzip-style
    `ContextReconstruction` scorer, `eviction.reconstruct`): chunk by chunk, `seq` is
    forked into the empty `scratch`, a repeat prompt and the chunk of `document` [1, S]
    are prefilled there (attending to the cached document), and `scratch` is reset. Then
    `cache.kv.compress(seq=seq)` keeps the best. `repeat`: the prompt's ids [1, R] before
    every chunk, or a function of the previous chunk's ids (None for the first) giving
    them (`repeat_prompts`). Collective."""
    kv = cache.kv
    co = kv.eviction
    if co is None:
        raise ValueError("reconstruct needs a cache with an eviction policy")
    total = document.shape[1]
    step = total if chunk_size is None else chunk_size
    before, co.chunk_compression = co.chunk_compression, False
    co.recon.begin(seq, scratch)
    try:
        for start in range(0, total, step):
            kv.fork(seq, [scratch])
            pre = (repeat(document[:, max(0, start - step):start] if start else None)
                   if callable(repeat) else repeat)
            ids = torch.cat([pre.to(document.device), document[:, start:start + step]], 1)
            prefill(model, ids, cache, seq=scratch, logits=False)
            kv.reset(scratch)
        co.recon.end()
    finally:
        co.chunk_compression, co.recon.scratch = before, None


@torch.no_grad()
def answer_questions(model: Any, cache: RingmemCache, document: Tensor,
                     questions: list[Tensor], *, max_new_tokens: int,
                     eos_token_id: int | list[int] | None, chunk_size: int | None = None,
                     compress: str | None = None, prefilled: bool = False,
                     progress: Callable[[int], None] | None = None,
                     keep_logits: bool = False,
                     stop_token_ids: Collection[int] = (),
                     repeat: Tensor | Callable[[Tensor | None], Tensor] | None = None
                     ) -> Iterator[Answer]:
    """Answer every question [1, Q_i] about `document` [1, S] (see the module doc); yields
    each `Answer` as its row finishes. Every rank calls it alike. The cache must hold
    max_seqs >= len(questions) sequences, empty, unless `prefilled` (the document is
    already in sequence 0, e.g. loaded from disk). `compress`: None, "document" or
    "question" (needs a cache with an eviction policy). `progress(n)`: document tokens
    prefilled so far. `keep_logits`: each answer carries its logits (tests; the LM head
    then runs whole on every rank, else each rank computes its slice of the vocabulary,
    `hf_vocab`). `stop_token_ids`: a row also ends after one of these, kept in its tokens,
    unless it is the row's first (e.g. the tokens holding a newline: one-line answers).
    `repeat`: the repeat prompt (`reconstruct`), for a scorer that reconstructs the context (with
    compress="document", `reconstruct` scores the document before it is compressed)."""
    kv = cache.kv
    n, rows = len(questions) if isinstance(questions, list) else -1, kv.config.max_seqs
    if not isinstance(questions, list) or not 1 <= n <= rows:
        raise ValueError(f"questions must be a list of 1 to max_seqs={rows} token tensors, "
                         f"got {n} question(s)")
    if compress not in (None, *COMPRESS):
        raise ValueError(f"compress must be None or one of {COMPRESS}, got {compress!r}")
    if compress is not None and kv.eviction is None:
        raise ValueError(f"compress={compress!r} needs a cache with an eviction policy")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    stops = set(stop_token_ids)
    t0 = time.perf_counter()
    if kv.eviction is not None:  # the document is compressed per chunk if the policy says so
        kv.eviction.chunk_compression = True
    if not prefilled:
        if any(kv.next_position(s) for s in range(rows)):
            raise ValueError("the cache is not empty: call cache.reset() first (or pass "
                             "prefilled=True with the document in sequence 0)")
        prefill(model, document, cache, seq=0, chunk_size=chunk_size, progress=progress,
                logits=False)
        if compress == "document":
            if getattr(kv.eviction.policy.scorer, "reconstructs", False):
                if repeat is None or rows < 2:
                    raise ValueError("a context-reconstruction scorer needs repeat= (the "
                                     "repeat prompt's ids) and max_seqs >= 2 (a scratch row)")
                reconstruct(model, cache, document, repeat, chunk_size=chunk_size)
            kv.compress(seq=0)
    doc_len = kv.next_position(0)
    kv.fork(0, list(range(1, rows)))
    if kv.eviction is not None:  # questions are compressed by `compress` alone, not per chunk
        kv.eviction.chunk_compression = False
    rowq = [questions[min(s, n - 1)] for s in range(rows)]  # extra rows repeat the last
    # all but each question's last token (the first decode step reads it, as generate()
    # does, so the first answer token already sees recalled tier pages: prefill attends
    # hot tokens only), the rows packed into as few passes as `chunk_size` allows
    t1 = time.perf_counter()
    for group in _packs([q.shape[1] - 1 for q in rowq], chunk_size):
        if len(group) > 1:
            prefill_rows(model, [rowq[s][:, :-1] for s in group], cache, group)
        else:  # alone (maybe longer than a chunk): chunk by chunk
            prefill(model, rowq[group[0]][:, :-1], cache, seq=group[0],
                    chunk_size=chunk_size, logits=False)
    if compress == "question":
        for s in range(rows):
            kv.compress(seq=s)
    spent = time.perf_counter() - t1
    tokens = torch.stack([q[0, -1] for q in rowq])
    out: list[list[int]] = [[] for _ in range(rows)]
    kept: list[list[Tensor]] = [[] for _ in range(rows)]
    done, first = [False] * rows, 0.0
    # the whole logits for keep_logits; a head split_head cannot slice stays whole
    split = (not keep_logits and kv.world > 1
             and isinstance(model.get_output_embeddings(), torch.nn.Linear))
    for step in range(max_new_tokens):
        pos = torch.tensor([[kv.next_position(s)] for s in range(rows)],
                           device=document.device)
        # each rank's LM head covers its slice of the vocabulary (unless the whole
        # logits are kept): one vocabulary-sized product per step split over the ranks
        with split_head(model, kv.group) if split else nullcontext(0) as lo:
            logits = model(input_ids=tokens[:, None].to(document.device), position_ids=pos,
                           use_cache=True, **cache_kwargs(model, cache)).logits
        step_logits = logits[:, -1].float()
        tokens = greedy(step_logits, lo, kv.group) if split else step_logits.argmax(-1)
        if step == 0:
            first = time.perf_counter() - t0
        for s in range(n):
            if done[s]:
                continue
            tok = int(tokens[s])
            if keep_logits:
                kept[s].append(step_logits[s].clone())
            if (tok in eos or step == max_new_tokens - 1
                    or (tok in stops and out[s])):
                done[s] = True
                if tok not in eos:
                    out[s].append(tok)
                yield Answer(s, out[s], spent, time.perf_counter() - t0,
                             doc_len + questions[s].shape[1], first, tuple(kept[s]))
            else:
                out[s].append(tok)
        if all(done[:n]):
            return
