"""transformers integration: distributed prefill logits equal the single-process model's."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import ringmem  # noqa: E402
from ringmem.integrations import hf  # noqa: E402
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


def _distributed(rank: int, world: int, kind: str, layout: str) -> None:
    ids = torch.randint(0, 128, (2, 8 * world), generator=torch.Generator().manual_seed(1))
    ref = _logits(kind, torch.float64, ids, "eager")
    base = _logits(kind, torch.float32, ids, "eager")
    model = _model(kind, torch.float32)
    model.set_attn_implementation(hf.register(layout=layout))
    local_ids, pos = hf.shard_tokens(ids, layout=layout)
    with torch.no_grad():
        local = model(input_ids=local_ids, position_ids=pos).logits
    got = ringmem.unshard(local.contiguous(), layout=layout)
    msg = check_close(f"{kind} {layout} logits", got, ref, base, torch.float32)
    assert msg is None, msg
    assert torch.equal(got.argmax(-1), ref.argmax(-1)), "greedy next tokens differ"


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("world,layout", [(2, "zigzag"), (4, "stripe")])
def test_distributed_prefill_logits_equal_single_process(kind: str, world: int,
                                                         layout: str) -> None:
    spawn(_distributed, world, kind, layout, timeout=300)


def test_padding_is_refused_not_ignored() -> None:
    model = _model("llama", torch.float32)
    model.set_attn_implementation(hf.register())
    ids = torch.randint(0, 128, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    with pytest.raises(ValueError, match="does not take padding masks"):
        model(input_ids=ids, attention_mask=mask)
    with torch.no_grad():  # an all-ones mask is fine
        model(input_ids=ids, attention_mask=torch.ones_like(mask))


def test_shard_tokens_validates() -> None:
    with pytest.raises(ValueError, match=r"input_ids must be a \[B, S\] tensor"):
        hf.shard_tokens(torch.zeros(8, dtype=torch.long))
