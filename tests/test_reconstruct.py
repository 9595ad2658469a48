"""Context-reconstruction scores (KVzip-style, question-agnostic): each cached key of the
document scores the most attention any reconstruction query gives it (max over the query
heads of its KV head), exactly as a single-process float64 softmax over the document and
the repeat so far; compression then keeps the global top-k of those scores."""
from __future__ import annotations

import pytest
import torch

from ringmem.cache import CacheConfig, ShardedKVCache
from ringmem.eviction import ContextReconstruction, EvictionPolicy
from ringmem.testing import spawn

HQ, HKV, D, PS = 4, 2, 8, 4
DOC, REPEAT, CHUNK, BUDGET = 30, 13, 8, 9


def _tokens(seed: int, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, n, h, D, generator=g, dtype=torch.float64) for h in (HQ, HKV, HKV)]


def _prefill(cache: ShardedKVCache, seq: int, qkv: list[torch.Tensor]) -> None:
    n, w = qkv[0].shape[1], cache.world
    for c0 in range(0, n, CHUNK):
        m = min(CHUNK, n - c0)
        pad = -(-m // w) * w
        parts = [cache.shard_chunk(torch.cat([t[:, c0:c0 + m],
                                              t.new_zeros(1, pad - m, *t.shape[2:])], 1))
                 for t in qkv]
        cache.prefill_chunk(0, *parts, seq=seq, n_valid=m)


def _reference(doc: list[torch.Tensor], rec: list[torch.Tensor], scale: float) -> torch.Tensor:
    """[Hkv, DOC]: max over reconstruction queries (each repeat chunk attends to the whole
    document and causally to its own chunk) and over the query heads of a KV head."""
    g = HQ // HKV
    best = torch.zeros(HKV, DOC, dtype=torch.float64)
    for c0 in range(0, REPEAT, CHUNK):
        q, k, v = (t[0, c0:c0 + CHUNK] for t in rec)
        m = q.shape[0]
        for h in range(HKV):
            keys = torch.cat([doc[1][0, :, h], k[:, h]])  # [DOC + m, D]
            s = torch.einsum("tgd,nd->tgn", q[:, h * g:(h + 1) * g], keys) * scale
            own = torch.arange(m)[:, None] >= torch.arange(m)[None, :]  # causal in-chunk
            allowed = torch.cat([torch.ones(m, DOC, dtype=torch.bool), own], 1)
            s = s.masked_fill(~allowed[:, None, :], float("-inf"))
            p = torch.softmax(s, -1)[..., :DOC]
            best[h] = torch.maximum(best[h], p.amax((0, 1)))
    return best


def _run(rank: int, world: int) -> None:
    cfg = CacheConfig(num_layers=1, q_heads=HQ, kv_heads=HKV, head_dim=D, capacity=64,
                      page_size=PS, max_seqs=2, dtype=torch.float64, layout="contiguous")
    policy = EvictionPolicy(scorer=ContextReconstruction(), budget=BUDGET / DOC, sinks=0,
                            recent=0, prefill="after")
    cache = ShardedKVCache(cfg, eviction=policy)
    doc, rec = _tokens(1, DOC), _tokens(2, REPEAT)
    _prefill(cache, 0, doc)
    with pytest.raises(ValueError, match="scores by context reconstruction"):
        cache.compress(seq=0)  # no pass yet: every rank refuses
    co = cache.eviction
    co.recon.begin(0, 1)
    for c0 in range(0, REPEAT, CHUNK):  # as hf_questions.reconstruct: fork, prefill, reset
        cache.fork(0, [1])
        _prefill(cache, 1, [t[:, c0:c0 + CHUNK] for t in rec])
        cache.reset(1)
    co.recon.end()
    want = _reference(doc, rec, D ** -0.5)
    ent = co.view.entries(0, 0)
    for h in range(HKV):
        got = ent.scores[h].double()
        pos = ent.positions[h]
        assert torch.allclose(got, want[h, pos], rtol=1e-6, atol=1e-9), (rank, h)
    cache.compress(seq=0)
    kept = [torch.cat([torch.as_tensor(p) for p in x]) for x in _kept(cache, world)]
    for h in range(HKV):
        top = set(torch.topk(want[h], BUDGET).indices.tolist())
        assert set(kept[h].tolist()) == top, (rank, h)


def _kept(cache: ShardedKVCache, world: int) -> list[list[list[int]]]:
    """Per KV head, every rank's kept positions of (layer 0, seq 0)."""
    import torch.distributed as dist
    ent = cache.eviction.view.entries(0, 0)
    mine = [p.tolist() for p in ent.positions]
    every = [None] * world
    dist.all_gather_object(every, mine)
    return [[r[h] for r in every] for h in range(HKV)]


@pytest.mark.parametrize("world", [2, 3])
def test_reconstruction_scores_equal_a_float64_softmax_and_select_its_top_k(world: int) -> None:
    spawn(_run, world)


def _hf(rank: int, world: int) -> None:
    """Through `answer_questions(compress="document")` on a tiny Llama: the document is
    scored by repeating it, compressed to the budget before any question, and answered."""
    transformers = pytest.importorskip("transformers")
    from ringmem.integrations import hf, hf_cache, hf_questions
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   num_hidden_layers=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    model.set_attn_implementation(hf.register())
    g = torch.Generator().manual_seed(4)
    doc = torch.randint(1, 128, (1, 40), generator=g)
    qs = [torch.randint(1, 128, (1, 5), generator=g)]
    repeat = torch.randint(1, 128, (1, 6), generator=g)
    policy = EvictionPolicy(scorer=ContextReconstruction(), budget=0.25, sinks=1, recent=2)
    cache = hf_cache.RingmemCache.for_model(model, capacity=96, page_size=4, max_seqs=2,
                                            eviction=policy)
    with pytest.raises(ValueError, match="needs repeat="):
        list(hf_questions.answer_questions(model, cache, doc, qs, max_new_tokens=3,
                                           eos_token_id=None, compress="document"))
    cache.reset()
    seen: list = []

    def prompts(prev):  # KVzip's chunking: each chunk after the first sees the one before
        seen.append(prev)
        return repeat
    got = list(hf_questions.answer_questions(model, cache, doc, qs, max_new_tokens=3,
                                             eos_token_id=None, compress="document",
                                             repeat=prompts, chunk_size=8 * world))
    assert [len(a.tokens) for a in got] == [3]
    step = 8 * world
    assert seen[0] is None and len(seen) == -(-40 // step)
    for i, prev in enumerate(seen[1:]):
        assert torch.equal(prev, doc[:, i * step:(i + 1) * step])
    recs = [r for r in cache.kv.eviction.records if r.seq == 0]
    assert recs and all(r.kept_per_head == [10, 10] for r in recs)  # 0.25 of 40 tokens
    assert cache.kv.next_position(0) == 40 + 4 + 3  # the scratch row's repeat left no trace


@pytest.mark.parametrize("world", [2, 3])
def test_answer_questions_reconstructs_then_compresses(world: int) -> None:
    spawn(_hf, world)
