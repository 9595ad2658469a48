"""transformers models with sliding-window layers, sinks and softcap, on the ring path and
over a RingmemCache: random-init tiny Mistral, Qwen2, Gemma 2, Gemma 3 and GPT-OSS at 2-3
gloo ranks equal the single-process model (float64 reference, float32 baseline); packed
documents equal the documents run separately."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import ringmem  # noqa: E402
from ringmem.integrations import hf, hf_cache, hf_masks  # noqa: E402
from ringmem.testing import spawn  # noqa: E402

from _tolerance import check_close  # noqa: E402

W = 8  # every windowed test model's sliding window; prompts are longer
SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
GEN = dict(do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)


def _config(kind: str):
    t = transformers
    if kind == "mistral":
        return t.MistralConfig(**SMALL, num_hidden_layers=2, sliding_window=W)
    if kind == "qwen2":  # layers >= max_window_layers slide
        return t.Qwen2Config(**SMALL, num_hidden_layers=3, use_sliding_window=True,
                             sliding_window=W, max_window_layers=1)
    if kind == "gemma2":  # alternating sliding / full layers, logit softcap that bites
        return t.Gemma2Config(**SMALL, num_hidden_layers=2, head_dim=16, sliding_window=W,
                              attn_logit_softcapping=2.0, final_logit_softcapping=30.0,
                              query_pre_attn_scalar=16)
    if kind == "gemma3":
        return t.Gemma3TextConfig(**SMALL, num_hidden_layers=3, head_dim=16,
                                  sliding_window=W, query_pre_attn_scalar=16,
                                  layer_types=["sliding_attention", "full_attention",
                                               "sliding_attention"])
    if kind == "gpt_oss":  # sinks, alternating layers, a tiny mixture of experts
        return t.GptOssConfig(**SMALL, num_hidden_layers=2, head_dim=16, sliding_window=W,
                              num_local_experts=4, num_experts_per_tok=2)
    raise ValueError(kind)


def _model(kind: str, dtype: torch.dtype, impl: str):
    torch.manual_seed(0)
    # eager experts: the grouped matmul of GPT-OSS's mixture has no float64
    model = transformers.AutoModelForCausalLM.from_config(_config(kind),
                                                          experts_implementation="eager")
    for m in model.modules():  # sinks far from their near-zero init: they must matter
        if isinstance(getattr(m, "sinks", None), torch.nn.Parameter):
            m.sinks.data = torch.linspace(-1.0, 2.0, m.sinks.numel())
    model = model.to(dtype).eval()
    model.set_attn_implementation(impl)
    return model


def _check_prefill(kind: str, world: int, layout: str) -> None:
    ids = torch.randint(1, 128, (2, 12 * world), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = _model(kind, torch.float64, "eager")(input_ids=ids).logits
        base = _model(kind, torch.float32, "eager")(input_ids=ids).logits
        model = _model(kind, torch.float32, hf.register(layout=layout))
        local_ids, pos = hf.shard_tokens(ids, layout=layout)
        local = model(input_ids=local_ids, position_ids=pos, use_cache=False).logits
    got = ringmem.unshard(local.contiguous(), layout=layout)
    msg = check_close(f"{kind} {layout} logits", got, ref, base, torch.float32)
    assert msg is None, msg


def _check_generate(kind: str, world: int) -> None:
    ref_m, base_m = (_model(kind, d, "eager") for d in (torch.float64, torch.float32))
    model = _model(kind, torch.float32, hf.register())
    ids = torch.randint(1, 128, (1, 2 * W + 5), generator=torch.Generator().manual_seed(2))
    new = 6
    ref, base = (m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                            **GEN) for m in (ref_m, base_m))
    assert ref.sequences.shape[1] > ids.shape[1] + 1, "the reference stopped at once"

    def check(what, got):
        assert torch.equal(got.sequences[0], ref.sequences[0]), f"{kind} {what}: tokens differ"
        for step, (g, r, b) in enumerate(zip(got.logits, ref.logits, base.logits)):
            msg = check_close(f"{kind} {what} step {step}", g, r, b, torch.float32)
            assert msg is None, msg
        return got

    # sharded chunked prefill (chunks cross the window), then decode
    cache = hf_cache.RingmemCache.for_model(model, capacity=64, page_size=4)
    got = check("prefill+generate", hf_cache.generate(model, ids, cache,
                                                      chunk_size=2 * world,
                                                      max_new_tokens=new, **GEN))
    stats = hf_cache.cache_stats(cache)
    windowed = stats["window_layers"]
    assert windowed == [i for i, w in enumerate(hf_masks.layer_windows(model.config))
                        if w >= 0] and windowed, stats
    assert stats["window_saved_bytes"] > 0, stats
    for layer in windowed:  # only the window is kept
        assert cache.kv.seq_len(0, layer) == W - 1, (layer, cache.kv.seq_len(0, layer))
    full = len(windowed) < model.config.num_hidden_layers  # else every layer is windowed
    fed = got.sequences.shape[1] - 1  # the last token is never fed (an EOS may stop early)
    assert stats["cached_tokens"] == [fed if full else W - 1], stats
    # plain generate on every rank: the cache splits the replicated prompt itself
    cache = hf_cache.RingmemCache.for_model(model, capacity=64, page_size=4)
    check("plain generate", model.generate(ids, attention_mask=torch.ones_like(ids),
                                           max_new_tokens=new,
                                           **hf_cache.cache_kwargs(model, cache), **GEN))


def _check_packed(kind: str, world: int, layout: str) -> None:
    """Two documents in one row (restarting position ids, no mask) equal each alone."""
    lens = (13, 11) if layout != "document" else (13, 9)
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(1, 128, (1, n), generator=g) for n in lens]
    cu = [0, lens[0], sum(lens)]
    row = torch.cat(docs, 1)
    with torch.no_grad():
        ref = torch.cat([_model(kind, torch.float64, "eager")(input_ids=d).logits
                         for d in docs], 1)
        base = torch.cat([_model(kind, torch.float32, "eager")(input_ids=d).logits
                          for d in docs], 1)
        model = _model(kind, torch.float32, hf.register(layout=layout))
        ids, pos = hf.shard_tokens(row, layout=layout, cu_seqlens=cu)
        extra = {"cu_seq_lens_q": torch.tensor(cu)} if layout == "document" else {}
        local = model(input_ids=ids, position_ids=pos, use_cache=False, **extra).logits
    got = ringmem.unshard(local.contiguous(), layout=layout,
                          cu_seqlens=cu if layout == "document" else None)
    msg = check_close(f"{kind} packed {layout}", got, ref, base, torch.float32)
    assert msg is None, msg


def _ranks(rank: int, world: int, kind: str, what: tuple[str, ...]) -> None:
    if "prefill" in what:
        _check_prefill(kind, world, "zigzag")
    if "prefill-contiguous" in what:
        _check_prefill(kind, world, "contiguous")
    if "generate" in what:
        _check_generate(kind, world)
    if "packed" in what:
        _check_packed(kind, world, "zigzag")
    if "packed-document" in what:
        _check_packed(kind, world, "document")


@pytest.mark.parametrize("kind,world,what", [
    ("mistral", 2, ("prefill", "generate", "packed", "packed-document")),
    ("qwen2", 3, ("prefill", "generate")),
    ("gemma2", 2, ("prefill", "prefill-contiguous", "generate", "packed")),
    ("gemma3", 2, ("prefill", "generate")),
    ("gpt_oss", 2, ("prefill", "generate", "packed")),
])
def test_windows_sinks_softcap_equal_single_process(kind: str, world: int,
                                                    what: tuple[str, ...]) -> None:
    if kind == "gpt_oss" and not hasattr(transformers, "GptOssConfig"):
        pytest.skip("this transformers has no GPT-OSS")
    spawn(_ranks, world, kind, what, timeout=300)


def test_layer_windows_from_configs() -> None:
    assert hf_masks.layer_windows(_config("mistral")) == [W - 1] * 2
    assert hf_masks.layer_windows(_config("qwen2")) == [-1, W - 1, W - 1]
    assert hf_masks.layer_windows(_config("gemma2")) == [W - 1, -1]
    assert hf_masks.layer_windows(transformers.LlamaConfig(**SMALL, num_hidden_layers=2)) \
        == [-1, -1]
    off = transformers.Qwen2Config(**SMALL, num_hidden_layers=2, use_sliding_window=False)
    assert hf_masks.layer_windows(off) == [-1, -1]
    chunked = _config("gemma3")
    chunked.layer_types = ["chunked_attention", "full_attention", "sliding_attention"]
    with pytest.raises(ValueError, match="layer_types"):
        hf_masks.layer_windows(chunked)
    with pytest.raises(ValueError, match="sliding_window"):
        hf_masks.window_left(0)


def test_unsupported_is_refused_by_name() -> None:
    model = _model("mistral", torch.float32, hf.register(layout="document"))
    ids = torch.randint(1, 128, (1, 8))
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        model(input_ids=ids, use_cache=False)
    # a cache built for other windows than the model's layers use
    model = _model("gemma2", torch.float32, hf.register())
    cache = hf_cache.RingmemCache.for_model(model, capacity=32, page_size=4)
    cache.kv.config.__dict__["windows"] = (-1, -1)  # as if built for a full-attention model
    with pytest.raises(ValueError, match="left window"):
        model(input_ids=ids, use_cache=True, **hf_cache.cache_kwargs(model, cache))
    with pytest.raises(ValueError, match="softcap"):
        ringmem.ring_attention(*(torch.randn(1, 4, 2, 8) for _ in range(3)), softcap=-1.0)
