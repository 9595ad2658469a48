"""The real SmolLM2-135M across 2 ranks: distributed logits equal single-process logits,
greedy output is identical, and a pass key in a ~4K-token KJV haystack is found."""
from __future__ import annotations

import pytest
import torch

from _demo import require_demo
from _tolerance import check_close

pytestmark = pytest.mark.slow
NEW = 12
GEN = dict(max_new_tokens=NEW, do_sample=False, output_logits=True,
           return_dict_in_generate=True)


def _ranks(rank: int, world: int, ids: torch.Tensor, ref: list, base: list, seqs: torch.Tensor,
           key: str) -> None:
    from ringmem.demo import haystack, models
    from ringmem.integrations import hf, hf_cache
    model, tok = models.load()
    model.set_attn_implementation(hf.register())
    cache = hf_cache.RingmemCache.for_model(model, capacity=ids.shape[1] // world + 512,
                                            page_size=128)
    got = hf_cache.generate(model, ids, cache, chunk_size=1024, pad_token_id=tok.eos_token_id,
                            **GEN)
    assert torch.equal(got.sequences, seqs), (f"rank {rank}: greedy output differs: "
                                              f"{got.sequences[0, ids.shape[1]:].tolist()} vs "
                                              f"{seqs[0, ids.shape[1]:].tolist()}")
    for step, (g, r, b) in enumerate(zip(got.logits, ref, base)):
        msg = check_close(f"rank {rank} step {step} logits", g, r, b, torch.float32)
        assert msg is None, msg
    reply = tok.decode(got.sequences[0, ids.shape[1]:], skip_special_tokens=True)
    assert haystack.answered(reply, key), f"pass key {key} not found in {reply!r}"


def test_smollm2_passkey_across_two_ranks() -> None:
    require_demo()
    from ringmem.demo import haystack, models
    from ringmem.testing import spawn
    model, tok = models.load()
    ids, key = haystack.passkey_prompt(tok, tokens=4000, depth=0.4, seed=7, offset=3000)
    assert 3500 <= ids.shape[1] <= 4000, ids.shape
    torch.set_num_threads(2)
    with torch.no_grad():
        base = model.generate(ids, pad_token_id=tok.eos_token_id, **GEN)
        ref = model.to(torch.float64).generate(ids, pad_token_id=tok.eos_token_id, **GEN)
    del model
    # the float64 model's greedy tokens are the reference output
    spawn(_ranks, 2, ids, [x.clone() for x in ref.logits], [x.clone() for x in base.logits],
          ref.sequences, key, timeout=600)
