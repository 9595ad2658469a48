"""Many questions from one prefill through a transformers model: tiny random Llama and
Gemma-3-style (window + global layers) models at 2-3 gloo ranks. Each question's greedy
tokens and logits equal an independent run's (within a float32 baseline of the float64
single-process model), and the document's pages are held once."""
from __future__ import annotations

import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ringmem.integrations import hf, hf_cache, hf_questions  # noqa: E402
from ringmem.testing import spawn  # noqa: E402

from _tolerance import check_close  # noqa: E402

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
DOC, NEW = 37, 5


def _model(kind: str, dtype: torch.dtype, impl: str):
    t = transformers
    cfg = (t.LlamaConfig(**SMALL, num_hidden_layers=2) if kind == "llama" else
           t.Gemma3TextConfig(**SMALL, num_hidden_layers=3, head_dim=16, sliding_window=8,
                              query_pre_attn_scalar=16,
                              layer_types=["sliding_attention", "full_attention",
                                           "sliding_attention"]))
    torch.manual_seed(0)
    model = t.AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    model.set_attn_implementation(impl)
    return model


def _greedy(model, ids: torch.Tensor, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and their logits, one full forward per step (no cache: a reference)."""
    toks, logits = [], []
    with torch.no_grad():
        for _ in range(steps):
            row = model(input_ids=ids).logits[0, -1]
            logits.append(row)
            toks.append(int(row.argmax()))
            ids = torch.cat([ids, torch.tensor([[toks[-1]]])], 1)
    return toks, logits


def _run(rank: int, world: int, kind: str, qlens: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(3)
    doc = torch.randint(1, 128, (1, DOC), generator=g)
    questions = [torch.randint(1, 128, (1, n), generator=g) for n in qlens]
    model = _model(kind, torch.float32, hf.register())
    cache = hf_cache.RingmemCache.for_model(model, capacity=64, page_size=4,
                                            max_seqs=len(qlens))
    got = sorted(hf_questions.answer_questions(model, cache, doc, questions,
                                               max_new_tokens=NEW, eos_token_id=None,
                                               chunk_size=4 * world, keep_logits=True),
                 key=lambda a: a.index)
    assert [a.index for a in got] == list(range(len(qlens)))
    ref_m, base_m = (_model(kind, d, "eager") for d in (torch.float64, torch.float32))
    for a, q in zip(got, questions):
        ids = torch.cat([doc, q], 1)
        want, ref = _greedy(ref_m, ids, NEW)
        _, base = _greedy(base_m, ids, NEW)
        assert a.tokens == want, (rank, a.index, a.tokens, want)
        for step, (x, r, b) in enumerate(zip(a.logits, ref, base)):
            msg = check_close(f"rank {rank} question {a.index} step {step}", x, r, b,
                              torch.float32)
            assert msg is None, msg
    # the LM head split over the ranks (no logits kept) picks the same tokens
    cache.reset()
    split = sorted(hf_questions.answer_questions(model, cache, doc, questions,
                                                 max_new_tokens=NEW, eos_token_id=None,
                                                 chunk_size=4 * world),
                   key=lambda a: a.index)
    assert [a.tokens for a in split] == [a.tokens for a in got]
    assert model.lm_head.out_features == 128  # its own head is back
    # held once: a global layer's pages are the document's (once) plus each row's own
    glob = next(i for i in range(cache.kv.config.num_layers) if cache.kv.config.window(i) < 0)
    st = cache.kv.stores[glob]
    tables = [set(t) for t in st.tables[:len(qlens)]]
    shared = set.intersection(*tables) if len(tables) > 1 else set()
    assert st.pages_in_use == len(set.union(*tables))
    if len(qlens) > 1:
        assert shared and all(st.refs[p] == len(qlens) for p in shared)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("kind,qlens", [("llama", (4,)), ("llama", (3, 7, 1)),
                                        ("gemma3", (5, 2, 9))])
def test_questions_equal_independent_runs(world: int, kind: str, qlens: tuple) -> None:
    spawn(_run, world, kind, qlens)


def _rows(rank: int, world: int, kind: str) -> None:
    """`prefill_rows` (the rows packed in one chunk) returns each row's last-token logits
    as `prefill` row by row does, and leaves the same cache to decode from."""
    g = torch.Generator().manual_seed(5)
    doc = torch.randint(1, 128, (1, DOC), generator=g)
    prompts = [torch.randint(1, 128, (1, n), generator=g) for n in (4, 1, 6)]
    model = _model(kind, torch.float32, hf.register())
    caches = [hf_cache.RingmemCache.for_model(model, capacity=64, page_size=4, max_seqs=3)
              for _ in range(2)]
    for c in caches:
        hf_cache.prefill(model, doc, c, seq=0, chunk_size=4 * world, logits=False)
        c.kv.fork(0, [1, 2])
    got = hf_cache.prefill_rows(model, prompts, caches[0], [0, 1, 2], logits=True)
    want = torch.cat([hf_cache.prefill(model, p, caches[1], seq=s)
                      for s, p in enumerate(prompts)])
    assert got.shape == want.shape == (3, 128)
    ref_m, base_m = (_model(kind, d, "eager") for d in (torch.float64, torch.float32))
    for s, p in enumerate(prompts):
        ids = torch.cat([doc, p], 1)
        with torch.no_grad():
            ref, base = (m(input_ids=ids).logits[0, -1] for m in (ref_m, base_m))
        for name, x in (("packed", got[s]), ("row by row", want[s])):
            msg = check_close(f"rank {rank} row {s} {name}", x, ref, base, torch.float32)
            assert msg is None, msg
    tok = got.argmax(-1)[:, None]
    pos = torch.tensor([[DOC + p.shape[1]] for p in prompts])
    with torch.no_grad():
        outs = [model(input_ids=tok, position_ids=pos, use_cache=True,
                      **hf_cache.cache_kwargs(model, c)).logits[:, -1] for c in caches]
    for s, p in enumerate(prompts):  # the next step, from each cache, against the models
        ids = torch.cat([doc, p, tok[s:s + 1]], 1)
        with torch.no_grad():
            ref, base = (m(input_ids=ids).logits[0, -1] for m in (ref_m, base_m))
        for name, x in (("packed", outs[0][s]), ("row by row", outs[1][s])):
            msg = check_close(f"rank {rank} row {s} {name}, next step", x, ref, base,
                              torch.float32)
            assert msg is None, msg
    with pytest.raises(ValueError, match="prompts\\[1\\] must be one non-empty"):
        hf_cache.prefill_rows(model, [prompts[0], prompts[0][:, :0]], caches[0], [1, 2])


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_prefill_rows_equals_row_by_row(world: int, kind: str) -> None:
    spawn(_rows, world, kind)


def _stops(rank: int, world: int) -> None:
    """A stop token ends its row after being emitted (kept in the row's tokens), except as
    the row's first token; other rows go on; the answers are a prefix of the unstopped."""
    g = torch.Generator().manual_seed(3)
    doc = torch.randint(1, 128, (1, DOC), generator=g)
    questions = [torch.randint(1, 128, (1, n), generator=g) for n in (3, 5, 4)]
    model = _model("llama", torch.float32, hf.register())
    cache = hf_cache.RingmemCache.for_model(model, capacity=64, page_size=4, max_seqs=3)

    def run(stops: set[int]) -> list[list[int]]:
        cache.reset()
        got = hf_questions.answer_questions(model, cache, doc, questions, max_new_tokens=NEW,
                                            eos_token_id=None, stop_token_ids=stops)
        return [a.tokens for a in sorted(got, key=lambda a: a.index)]
    free = run(set())
    stop = {free[0][1], free[1][0]}  # row 0's second token; row 1's first
    for row, got in zip(free, run(stop)):
        cut = next((i + 1 for i, t in enumerate(row) if t in stop and i > 0), len(row))
        assert got == row[:cut], (rank, row, got, stop)
    assert len(run(stop)[0]) == 2


@pytest.mark.parametrize("world", [2, 3])
def test_stop_tokens_end_their_row_only(world: int) -> None:
    spawn(_stops, world)


def test_one_line_answers_stop_at_a_token_holding_a_newline() -> None:
    from ringmem.config import InferConfig
    from ringmem.demo import models
    from ringmem.launch.documents import Documents
    tok = models.load_tokenizer(models.BUNDLED)
    docs = Documents(InferConfig(), torch.nn.Linear(1, 1), tok, world=1, rank=0,
                     revision="test")
    ids = docs.newlines()
    assert tok("\n", add_special_tokens=False)["input_ids"][0] in ids
    assert all("\n" in tok.decode([i]) for i in ids)
    assert not any("\n" in tok.decode([i]) for i in range(200) if i not in ids)


def test_streaming_says_when_the_document_is_compressed() -> None:
    """compress="document": after every prefill chunk (streaming, pools sized for the budget
    plus a chunk) or once after the whole document (the pools hold all of it first);
    kvzip always once."""
    import transformers

    from ringmem.config import InferConfig
    from ringmem.launch.documents import Documents
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   num_hidden_layers=2, max_position_embeddings=4096)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    base = InferConfig(eviction="snapkv", budget=0.25, compress="document", chunk_size=256)
    caps = {}
    for streaming in (True, False):
        run = dataclasses.replace(base, streaming=streaming)
        docs = Documents(run, model, None, world=1, rank=0, revision="test")
        policy, _ = docs.policies(run)
        assert policy.prefill == ("chunk" if streaming else "after")
        caps[streaming] = docs.capacity(run, 3000, 1, policy)
    assert caps[True] < 3000 <= caps[False]  # budget + a chunk, vs the whole document
    kv = dataclasses.replace(base, eviction="kvzip", streaming=True)
    policy, _ = Documents(kv, model, None, world=1, rank=0, revision="t").policies(kv)
    assert policy.prefill == "after"
