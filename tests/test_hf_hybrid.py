"""A tiny random Gemma-3-style model (sliding and full layers) over a RingmemCache with
eviction and tiers, saved after the prompt and loaded into a fresh cache to decode: equal to
the float64 single-process model where nothing is lost (tiers recall every page), and to the
world-1 cache of the same policy where tokens are dropped (greedy tokens equal)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ringmem.cache import ShardedKVCache, TierPolicy  # noqa: E402
from ringmem.eviction import EvictionPolicy, SnapKV  # noqa: E402
from ringmem.integrations import hf, hf_cache  # noqa: E402
from ringmem.testing import spawn  # noqa: E402

from _tolerance import check_close  # noqa: E402

W, NEW, CHUNK = 8, 6, 6  # CHUNK: a multiple of every world size tested
LAYERS = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
GEN = dict(do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
           max_new_tokens=NEW)


def _model(dtype: torch.dtype, impl: str):
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(**SMALL, num_hidden_layers=len(LAYERS), head_dim=16,
                                        sliding_window=W, query_pre_attn_scalar=16,
                                        layer_types=LAYERS)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    model.set_attn_implementation(impl)
    return model


def _ids() -> torch.Tensor:
    return torch.randint(1, 128, (1, 2 * W + 5), generator=torch.Generator().manual_seed(2))


def _policy(case: str) -> EvictionPolicy:
    if case == "tiers":  # SnapKV as shipped; whatever it drops is recalled
        return EvictionPolicy(scorer=SnapKV(), budget=6, sinks=1, recent=2, observe=4,
                              decode_every=2)
    # hard drops, one pool over the global layers; kernel 1: SnapKV's pooling sees only a
    # rank's own neighbours (its docstring), which would make the kept set world-dependent
    return EvictionPolicy(scorer=SnapKV(kernel=1), budget=6, sinks=1, recent=2, observe=4,
                          decode_every=2, allocation="global")


def _tiers(case: str) -> TierPolicy | None:
    return TierPolicy(host_pages=64, recall=1000) if case == "tiers" else None


def _generate(model, case: str, root: Path, world: int):
    """Prefill the prompt sharded, compress, save; load into a fresh cache and generate."""
    ids = _ids()
    cache = hf_cache.RingmemCache.for_model(model, capacity=64, page_size=4,
                                            eviction=_policy(case), tiers=_tiers(case))
    hf_cache.prefill(model, ids[:, :-1], cache, chunk_size=CHUNK)
    cache.kv.compress()
    _check_stats(cache.kv, case)
    cache.kv.save(root, model_id="tiny-gemma3")
    cache.kv.close()
    kv = ShardedKVCache.load(root, cache.kv.config, model_id="tiny-gemma3",
                             eviction=_policy(case), tiers=_tiers(case))
    resumed = hf_cache.RingmemCache(kv)
    assert resumed.get_seq_length() == ids.shape[1] - 1
    out = model.generate(ids, attention_mask=torch.ones_like(ids),
                         **hf_cache.cache_kwargs(model, resumed), **GEN)
    _check_stats(kv, case)  # decode-time compressions ("global": after layer 2, not 3)
    kv.close()
    return out


def _check_stats(kv: ShardedKVCache, case: str) -> None:
    stats = kv.eviction.stats()
    for layer, kind in enumerate(LAYERS):
        s = stats[f"layer{layer}"]
        windowed = kind == "sliding_attention"
        assert s["windowed"] == windowed and s["window"] == (W - 1 if windowed else -1), s
        assert (s["compressions"] == 0) == windowed and (s["evicted"] == 0) == windowed, s
    if case == "tiers":
        assert {k[0] for k in kv.tiers.store.keys()} | {k[0] for k in kv.tiers.pending} \
            <= {0, 2}


def _check(what: str, got, ref, base) -> None:
    assert torch.equal(got.sequences[0], ref.sequences[0]), f"{what}: tokens differ"
    for step, (g, r, b) in enumerate(zip(got.logits, ref.logits, base.logits)):
        msg = check_close(f"{what} step {step}", g, r, b, torch.float32)
        assert msg is None, msg


def _ranks(rank: int, world: int, refs: dict, root: str) -> None:
    model = _model(torch.float32, hf.register())
    for case in ("tiers", "drop"):
        got = _generate(model, case, Path(root) / f"{case}{world}", world)
        _check(f"{case} world {world}", got, *refs[case])


@pytest.mark.parametrize("world", [2, 3])
def test_gemma3_style_eviction_tiers_save_load(tmp_path, world: int) -> None:
    ids = _ids()
    # nothing lost: the float64 model itself (float32 baseline)
    exact = [_model(d, "eager").generate(ids, attention_mask=torch.ones_like(ids), **GEN)
             for d in (torch.float64, torch.float32)]
    assert exact[0].sequences.shape[1] == ids.shape[1] + NEW, "the reference stopped early"
    # tokens dropped: the world-1 cache of the same policy, float64 (float32 baseline)
    drop = [_generate(_model(d, hf.register()), "drop", tmp_path / f"w1-{d}", 1)
            for d in (torch.float64, torch.float32)]
    assert not torch.allclose(drop[0].logits[0], exact[0].logits[0], atol=1e-3), \
        "the dropped tokens should change the logits"
    spawn(_ranks, world, {"tiers": exact, "drop": drop}, str(tmp_path), timeout=300)
