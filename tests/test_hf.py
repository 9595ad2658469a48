"""transformers integration: distributed prefill logits equal the single-process model's."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import ringmem  # noqa: E402
from ringmem.integrations import hf, hf_cache  # noqa: E402
from ringmem.testing import spawn  # noqa: E402

from _tolerance import check_close  # noqa: E402

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def _model(kind: str, dtype: torch.dtype):
    cfgs = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
            "qwen3": transformers.Qwen3Config}
    extra = {"head_dim": 16} if kind == "qwen3" else {}  # Qwen3 defaults head_dim to 128
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfgs[kind](**SMALL, **extra))
    return model.to(dtype).eval()


def _logits(kind: str, dtype: torch.dtype, ids: torch.Tensor, impl: str) -> torch.Tensor:
    model = _model(kind, dtype)
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(input_ids=ids).logits


def _distributed(rank: int, world: int, kind: str, layout: str, **options) -> None:
    ids = torch.randint(0, 128, (2, 8 * world), generator=torch.Generator().manual_seed(1))
    ref = _logits(kind, torch.float64, ids, "eager")
    base = _logits(kind, torch.float32, ids, "eager")
    model = _model(kind, torch.float32)
    model.set_attn_implementation(hf.register(layout=layout, **options))
    local_ids, pos = hf.shard_tokens(ids, layout=layout)
    with torch.no_grad():
        local = model(input_ids=local_ids, position_ids=pos).logits
    got = ringmem.unshard(local.contiguous(), layout=layout)
    msg = check_close(f"{kind} {layout} {options} logits", got, ref, base, torch.float32)
    assert msg is None, msg
    assert torch.equal(got.argmax(-1), ref.argmax(-1)), "greedy next tokens differ"


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("world,layout", [(2, "zigzag"), (3, "contiguous"), (4, "stripe")])
def test_distributed_prefill_logits_equal_single_process(kind: str, world: int,
                                                         layout: str) -> None:
    spawn(_distributed, world, kind, layout, timeout=300)


def _distributed_options(rank: int, world: int, schedule: str, ulysses: int) -> None:
    """register(schedule=, ulysses=) reach ring_attention (recorded, with its traffic) and
    the logits stay the single-process model's."""
    seen = []
    real = hf.ring_attention

    def recording(*args, **kwargs):
        stats = ringmem.CommStats()
        seen.append((kwargs["schedule"], kwargs["ulysses"], stats))
        return real(*args, stats=stats, **kwargs)
    hf.ring_attention = recording  # this rank's process only (spawn starts fresh ones)
    _distributed(rank, world, "llama", "zigzag", schedule=schedule, ulysses=ulysses)
    assert seen and all(s[:2] == (schedule, ulysses) for s in seen), [s[:2] for s in seen]
    a2a = [r for _, _, st in seen for r in st.records if r["channel"] == "a2a"]
    assert bool(a2a) == (ulysses > 1), f"ulysses={ulysses}: {len(a2a)} all-to-alls"


@pytest.mark.parametrize("schedule,ulysses", [("allgather", 1), ("kv", 2)])
def test_register_schedule_and_ulysses_reach_ring_attention(schedule: str,
                                                            ulysses: int) -> None:
    spawn(_distributed_options, 2, schedule, ulysses, timeout=300)


def test_register_checks_its_options() -> None:
    for bad in (0, -2, 1.5, True, "2"):
        with pytest.raises(ValueError, match=f"ulysses must be an int >= 1 or 'auto', got "
                                             f"{bad!r}"):
            hf.register(name="ringmem-bad", ulysses=bad)
    with pytest.raises(ValueError, match=r"schedule must be one of .*got 'ring'"):
        hf.register(name="ringmem-bad", schedule="ring")
    assert hf.registered(hf.register(name="ringmem-ok", schedule="allgather", ulysses="auto"))


def test_ring_path_right_padding_exact_left_padding_refused() -> None:
    ids = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0  # right padding: causality already hides the pads from real tokens
    with torch.no_grad():
        ref = _model("llama", torch.float64).model(input_ids=ids, attention_mask=mask)
        base = _model("llama", torch.float32).model(input_ids=ids, attention_mask=mask)
        model = _model("llama", torch.float32)
        model.set_attn_implementation(hf.register())
        got = model.model(input_ids=ids, attention_mask=mask, use_cache=False)
    real = mask.bool()
    msg = check_close("right-padded hidden states", got.last_hidden_state[real],
                      ref.last_hidden_state[real], base.last_hidden_state[real], torch.float32)
    assert msg is None, msg
    left = mask.flip(1)
    with pytest.raises(ValueError, match="right padding only"):
        model(input_ids=ids, attention_mask=left, use_cache=False)
    with pytest.raises(ValueError, match="a transformers cache is in use"):
        out = model(input_ids=ids[:, :4], use_cache=True)
        model(input_ids=ids[:, 4:], past_key_values=out.past_key_values)


def _generate(rank: int, world: int, kind: str) -> None:
    gen = dict(do_sample=False, output_logits=True, return_dict_in_generate=True,
               pad_token_id=0)
    models = {}
    for name, dtype in (("ref", torch.float64), ("base", torch.float32)):
        models[name] = _model(kind, dtype)
        models[name].set_attn_implementation("eager")
    model = _model(kind, torch.float32)
    model.set_attn_implementation(hf.register())

    def check(what, got, ids, row=0):
        n = ids.shape[1]  # references run unpadded: a padded row must equal its own sequence
        ref, base = (models[k].generate(ids, attention_mask=torch.ones_like(ids),
                                        max_new_tokens=len(got.logits), **gen)
                     for k in ("ref", "base"))
        assert torch.equal(got.sequences[row, -len(got.logits):], ref.sequences[0, n:]), \
            f"{what}: greedy tokens differ"
        for step, (g, r, b) in enumerate(zip(got.logits, ref.logits, base.logits)):
            msg = check_close(f"{what} step {step} logits", g[row], r[0], b[0], torch.float32)
            assert msg is None, msg

    ids = torch.randint(0, 128, (1, 8 * world + 5), generator=torch.Generator().manual_seed(1))
    ids[0, 3] = 0  # the pad token inside a prompt is a real token, not padding
    # sharded chunked prefill (chunks of 2*world tokens, the last one partial), then decode
    cache = hf_cache.RingmemCache.for_model(model, capacity=64, page_size=4)
    check("prefill+generate", hf_cache.generate(model, ids, cache, chunk_size=4 * world,
                                                max_new_tokens=6, **gen), ids)
    counts = cache.kv.rank_counts()
    assert sum(counts) == ids.shape[1] + 5 and max(counts) - min(counts) <= 1, counts
    # plain generate on every rank: the replicated prompt is split by the cache itself
    cache = hf_cache.RingmemCache.for_model(model, capacity=64, page_size=4)
    check("plain generate", model.generate(ids, attention_mask=torch.ones_like(ids),
                                           past_key_values=cache, max_new_tokens=6, **gen), ids)
    # a left-padded batch: pads are never cached, real tokens never see them
    ids2 = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids2)
    mask[1, :5] = 0
    cache = hf_cache.RingmemCache.for_model(model, capacity=64, page_size=4, max_seqs=2)
    got = model.generate(ids2, attention_mask=mask, past_key_values=cache, max_new_tokens=5,
                         **gen)
    for row in range(2):
        check(f"padded batch row {row}", got, ids2[row, mask[row].bool()][None], row)
    assert [cache.kv.seq_len(s) for s in range(2)] == [12 + 4, 7 + 4]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_generate_equals_single_process(kind: str, world: int) -> None:
    spawn(_generate, world, kind, timeout=300)


def _generate_evicting(rank: int, world: int) -> None:
    from ringmem.eviction import EvictionPolicy, SnapKV
    gen = dict(do_sample=False, max_new_tokens=6, pad_token_id=0)
    model = _model("llama", torch.float32)
    model.set_attn_implementation(hf.register())
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(5))
    plain = hf_cache.generate(model, ids, hf_cache.RingmemCache.for_model(
        model, capacity=64, page_size=4), **gen)
    # a budget that covers the prompt evicts nothing: the same tokens
    keep_all = EvictionPolicy(scorer=SnapKV(), budget=64, sinks=2, recent=4, observe=4)
    cache = hf_cache.RingmemCache.for_model(model, capacity=64, page_size=4, eviction=keep_all)
    assert torch.equal(hf_cache.generate(model, ids, cache, **gen), plain)
    # a real budget: every layer x head holds at most 12 of the 39 prompt tokens after the
    # compression, plus the tokens fed since (the prompt's last one and 5 generated)
    small = EvictionPolicy(scorer=SnapKV(), budget=12, sinks=2, recent=4, observe=4)
    cache = hf_cache.RingmemCache.for_model(model, capacity=64, page_size=4, eviction=small)
    out = hf_cache.generate(model, ids, cache, **gen)
    assert out.shape == plain.shape
    for rec in cache.kv.eviction.records:
        assert max(rec.kept_per_head) <= 12 and rec.evicted == 2 * (39 - 12), rec
    for layer in range(2):
        held = cache.kv.head_counts_of(0, layer)  # [rank][head]
        assert all(sum(h) == 12 + 6 for h in zip(*held)), held
    # one pool over both layers and heads: 2 x 2 x 12 entries in all, each (layer, head)
    # at least its floor (6), then the 6 tokens fed since in every (layer, head)
    pooled = EvictionPolicy(scorer=SnapKV(), budget=12, sinks=2, recent=4, observe=4,
                            allocation="global", floor=0.5)
    cache = hf_cache.RingmemCache.for_model(model, capacity=64, page_size=4, eviction=pooled)
    assert hf_cache.generate(model, ids, cache, **gen).shape == plain.shape
    kept = [sum(h) for layer in range(2) for h in zip(*cache.kv.head_counts_of(0, layer))]
    assert sum(kept) == 4 * (12 + 6) and min(kept) >= 6 + 6, kept


def test_generate_with_eviction() -> None:
    spawn(_generate_evicting, 2, timeout=300)


def _generate_batch(rank: int, world: int) -> None:
    gen = dict(do_sample=False, max_new_tokens=5, pad_token_id=0, output_logits=True,
               return_dict_in_generate=True)
    model = _model("qwen2", torch.float32)
    model.set_attn_implementation(hf.register())
    ids = torch.randint(1, 128, (2, 19), generator=torch.Generator().manual_seed(6))
    cache = hf_cache.RingmemCache.for_model(model, capacity=64, page_size=4, max_seqs=2)
    for row in range(2):  # each row prefilled into its own sequence, at its own positions
        hf_cache.prefill(model, ids[row:row + 1, :-1], cache, seq=row, chunk_size=4 * world)
    got = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                         **gen)
    refs = {}
    for name, dtype in (("ref", torch.float64), ("base", torch.float32)):
        refs[name] = _model("qwen2", dtype)
        refs[name].set_attn_implementation("eager")
    for row in range(2):
        ref, base = (refs[k].generate(ids[row:row + 1], attention_mask=torch.ones_like(ids[:1]),
                                      **gen) for k in ("ref", "base"))
        assert torch.equal(got.sequences[row], ref.sequences[0]), row
        for step, (g, r, b) in enumerate(zip(got.logits, ref.logits, base.logits)):
            msg = check_close(f"row {row} step {step}", g[row], r[0], b[0], torch.float32)
            assert msg is None, msg


def test_generate_batch_of_two_rows() -> None:
    spawn(_generate_batch, 2, timeout=300)


def test_cache_refuses_what_it_cannot_do() -> None:
    model = _model("llama", torch.float32)
    model.set_attn_implementation(hf.register())
    ids = torch.randint(0, 128, (1, 9))
    cache = hf_cache.RingmemCache.for_model(model, capacity=32, page_size=4)
    with pytest.raises(ValueError, match="batch of 2 rows but the cache holds max_seqs=1"):
        model.generate(ids, past_key_values=cache, num_beams=2, max_new_tokens=2)
    cache = hf_cache.RingmemCache.for_model(model, capacity=32, page_size=4)
    with pytest.raises(ValueError, match="chunk_size must be a positive multiple"):
        hf_cache.prefill(model, ids, cache, chunk_size=0)
    with pytest.raises(ValueError, match=r"input_ids must be \[max_seqs=1, S\]"):
        hf_cache.generate(model, ids.expand(2, -1), cache)
    with pytest.raises(ValueError, match="capacity exceeded"):
        hf_cache.prefill(model, torch.randint(0, 128, (1, 40)), cache)
    with pytest.raises(TypeError, match="kv must be a ShardedKVCache"):
        hf_cache.RingmemCache(object())
    eager = _model("llama", torch.float32)
    eager.set_attn_implementation("eager")
    with pytest.raises(ValueError, match="RingmemCache needs ringmem's"):
        hf_cache.RingmemCache.for_model(eager, capacity=32)
    cache.reset()
    eager.set_attn_implementation("sdpa")  # switched after the cache was made
    with pytest.raises(ValueError, match="RingmemCache needs ringmem's attention"):
        eager.generate(ids, past_key_values=cache, max_new_tokens=2)


def test_shard_tokens_validates() -> None:
    with pytest.raises(ValueError, match=r"input_ids must be a \[B, S\] tensor"):
        hf.shard_tokens(torch.zeros(8, dtype=torch.long))


def _assigned_values(body: list) -> list[tuple[str, object]]:
    """(name, value node) of every assignment directly in `body` (a module or class body)."""
    import ast
    out = []
    for node in body:
        if isinstance(node, ast.Assign):
            out += [(ast.unparse(t), node.value) for t in node.targets]
        elif isinstance(node, ast.AugAssign) or (isinstance(node, ast.AnnAssign)
                                                 and node.value is not None):
            out.append((ast.unparse(node.target), node.value))  # (a bare annotation: none)
    return out


def test_integrations_hold_no_module_state() -> None:
    import ast
    from pathlib import Path

    import ringmem.integrations as pkg

    def immutable(v) -> bool:  # a constant other than None, or a tuple of them
        if isinstance(v, ast.Tuple):
            return all(immutable(e) for e in v.elts)
        return isinstance(v, ast.Constant) and v.value is not None

    files = sorted(Path(pkg.__file__).parent.glob("*.py"))
    assert {f.name for f in files} >= {"hf.py", "hf_cache.py"}, files
    for f in files:
        tree = ast.parse(f.read_text(), str(f))
        scopes = [tree.body] + [n.body for n in tree.body if isinstance(n, ast.ClassDef)]
        for body in scopes:
            names = [name for name, _ in _assigned_values(body)]
            assert len(names) == len(set(names)), f"{f.name}: a name is rebound: {names}"
            for name, value in _assigned_values(body):
                assert immutable(value), f"{f.name}: {name} = {ast.unparse(value)} is state"
        for node in ast.walk(tree):
            assert not isinstance(node, (ast.Global, ast.Nonlocal)), \
                f"{f.name}:{node.lineno}: {type(node).__name__.lower()} statement"
    hf_src = (Path(pkg.__file__).parent / "hf.py").read_text()
    assert "hf_cache" not in [getattr(n, "module", None) for n in ast.walk(ast.parse(hf_src))
                              if isinstance(n, ast.ImportFrom)], "hf imports hf_cache"


def test_registration_is_read_from_transformers_registry() -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    assert hf.registered(hf.register(name="ringmem-probe"))
    assert not hf.registered("sdpa") and not hf.registered("eager")
    assert not hf.registered("no-such-implementation") and not hf.registered(None)
    AttentionInterface.register("ringmem-probe", sdpa_attention_forward)  # replaced later
    assert not hf.registered("ringmem-probe")
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        hf.register(name="")


def test_cache_argument_name_and_no_future_warning() -> None:
    import inspect
    import warnings
    gen = dict(do_sample=False, max_new_tokens=4, pad_token_id=0)
    model = _model("llama", torch.float32)
    model.set_attn_implementation(hf.register())
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(7))

    def cache():
        return hf_cache.RingmemCache.for_model(model, capacity=32, page_size=4)
    new = "cache" in inspect.signature(model.forward).parameters
    c = cache()
    assert hf_cache.cache_kwargs(model, c) == ({"cache": c} if new else {"past_key_values": c})

    class Old(torch.nn.Module):  # a model from before the rename
        def forward(self, input_ids=None, past_key_values=None):
            return input_ids
    assert hf_cache.cache_kwargs(Old(), c) == {"past_key_values": c}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = hf_cache.generate(model, ids, c, **gen)
        hf_cache.prefill(model, ids, cache())
    assert not [w for w in seen if issubclass(w.category, FutureWarning)], \
        [str(w.message) for w in seen]
    # the cache works under either name (the old one may warn)
    ones = torch.ones_like(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for name in ("past_key_values", "cache") if new else ("past_key_values",):
            got = model.generate(ids, attention_mask=ones, **{name: cache()}, **gen)
            assert torch.equal(got, out), name
    with pytest.raises(TypeError, match="generate\\(\\) passes `cache`"):
        hf_cache.generate(model, ids, cache(), past_key_values=cache(), **gen)
