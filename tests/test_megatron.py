"""megatron-core GPTModel with ringmem's core attention: context parallelism is exact.

A tiny GQA GPTModel (same seed, same weights everywhere) gives the same loss and the same
gradient of every parameter at CP=1, 2 and 4 (gloo ranks), with plain batches (Megatron's own
`get_batch_on_this_cp_rank` split), with packed THD batches (`packed_seq_params`, padded
sequences, split per sequence as Transformer Engine's `thd_get_partitioned_indices` does),
and with a sliding window on one layer plus learnable sink logits.
Tolerances come from a baseline: the same model in float64 with a dense reference attention
is the truth, the same model in float32 with that dense attention is the error budget
(flash-attention's rule, `_tolerance.check_close`). Skipped without megatron-core.
"""
from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ringmem.testing import spawn

from _tolerance import check_close

if importlib.util.find_spec("megatron") is None or \
        importlib.util.find_spec("megatron.core") is None:
    pytest.skip("megatron-core is not installed (pip install --no-deps megatron-core==0.16.1)",
                allow_module_level=True)

from ringmem.integrations.megatron import RingmemCoreAttention  # megatron stays unimported

ROOT = Path(__file__).resolve().parents[1]
CASES = ("plain", "packed", "window")  # window: plain batches, sliding window and sinks
SEQ, BATCH, VOCAB = 48, 2, 64  # 48: Megatron splits a row in 2 * CP chunks, CP = 1-4
REAL = [13, 8, 19]  # packed sequences' real lengths; padded to multiples of 24 (2 * CP for
PADDED = [24, 24, 24]  # CP = 2, 3 and 4)
# fp32 gradients: ringmem's attention sums in another order than the dense baseline; over
# two layers the max-error ratio against the float64 truth measured up to 2.5x at CP=1-4 for
# the sink logits (ringmem's closed-form gradient vs autograd) and under 1.9x for every other
# tensor, so gradients get 3x. The loss is within a unit of rounding of the truth (the dense
# fp32 loss often rounds exactly), which check_close's rounding term covers; it keeps
# flash-attn's 2x. A wrong layout gives ratios of 1e6.
FACTOR_GRAD, FACTOR_LOSS = 3.0, 2.0


class DenseCoreAttention(RingmemCoreAttention):
    """Megatron core attention as a dense reference in any dtype (one process only). Built
    like ringmem's (same options, same sink parameter: the same weights), computed apart."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        from ringmem.reference import dense_mask, masked_reference

        sinks = self.softmax_offset
        if packed_seq_params is not None:  # [t, h, d]; pads see their own sequence only
            cu = packed_seq_params.cu_seqlens_q_padded.tolist()
            keep = dense_mask(query.shape[0], causal=True, window=self.window, cu_seqlens=cu)
            out, _ = masked_reference(query[None], key[None], value[None], keep,
                                      softmax_scale=self.softmax_scale, sinks=sinks)
            return out[0].flatten(1)
        keep = dense_mask(query.shape[0], causal=True, window=self.window)
        out, _ = masked_reference(*(t.transpose(0, 1) for t in (query, key, value)), keep,
                                  softmax_scale=self.softmax_scale, sinks=sinks)
        return out.transpose(0, 1).flatten(2)


def _model(cp: int, dense: bool, case: str, ulysses: int = 1):
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ringmem.integrations.megatron import ringmem_layer_spec

    # "window": layer 1 sees a sliding window, layer 2 everything (window_attn_skip_freq),
    # and learnable sink logits (softmax_type "learnable") in both
    extra = (dict(window_size=(5, 0), window_attn_skip_freq=2, softmax_type="learnable")
             if case == "window" else {})
    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
                               num_query_groups=2, use_cpu_initialization=True,
                               context_parallel_size=cp, attention_dropout=0.0,
                               hidden_dropout=0.0, softmax_scale=0.3, **extra)
    spec = ringmem_layer_spec(backend="auto", schedule="auto", ulysses=ulysses)
    if dense:
        spec.submodules.self_attention.submodules.core_attention = DenseCoreAttention
    torch.manual_seed(0)  # the same weights for every model and rank
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB,
                    max_sequence_length=SEQ * 2, position_embedding_type="rope")


def _global_batch(packed: bool) -> dict:
    g = torch.Generator().manual_seed(7)
    if not packed:
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
        return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
                "loss_mask": torch.ones(BATCH, SEQ),
                "position_ids": torch.arange(SEQ).expand(BATCH, SEQ)}
    tokens, labels, mask, pos = [], [], [], []
    for n, p in zip(REAL, PADDED):
        t = torch.randint(1, VOCAB, (n + 1,), generator=g)
        pad = torch.zeros(p - n, dtype=torch.long)
        tokens.append(torch.cat([t[:-1], pad]))
        labels.append(torch.cat([t[1:], pad]))
        mask.append(torch.cat([torch.ones(n), torch.zeros(p - n)]))
        pos.append(torch.arange(p))
    return {k: torch.cat(v)[None] for k, v in
            (("tokens", tokens), ("labels", labels), ("loss_mask", mask), ("position_ids", pos))}


def _thd_split(x: torch.Tensor, rank: int, cp: int) -> torch.Tensor:
    """Transformer Engine's THD CP split, from its definition: each padded sequence in 2*cp
    chunks, rank r keeps chunks r and 2*cp-1-r (dim 1)."""
    parts, at = [], 0
    for p in PADDED:
        c = x[:, at:at + p].chunk(2 * cp, dim=1)
        parts += [c[rank], c[2 * cp - 1 - rank]]
        at += p
    return torch.cat(parts, dim=1)


def _loss_and_grads(model, packed: bool, rank: int, cp: int, dtype: torch.dtype):
    """Masked mean loss over the global batch and every parameter's gradient, summed over
    the CP ranks (what Megatron's data-parallel x CP gradient reduction does)."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.utils import get_batch_on_this_cp_rank

    model = model.to(dtype)
    batch = _global_batch(packed)
    params = None
    if packed:
        real = torch.tensor([0, *torch.tensor(REAL).cumsum(0).tolist()], dtype=torch.int32)
        padded = torch.tensor([0, *torch.tensor(PADDED).cumsum(0).tolist()], dtype=torch.int32)
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=real, cu_seqlens_kv=real,
                                 cu_seqlens_q_padded=padded, cu_seqlens_kv_padded=padded,
                                 max_seqlen_q=max(PADDED), max_seqlen_kv=max(PADDED))
        batch = {k: _thd_split(v, rank, cp) for k, v in batch.items()}
    elif cp > 1:
        batch = get_batch_on_this_cp_rank(dict(batch))
    count = _global_batch(packed)["loss_mask"].sum()
    per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                      packed_seq_params=params)
    loss = (per_token * batch["loss_mask"].to(per_token.dtype)).sum() / count
    loss.backward()
    total = loss.detach().clone()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    if cp > 1:
        dist.all_reduce(total)
        for g in grads.values():
            dist.all_reduce(g)
    return total, grads


def _setup(world: int) -> None:
    from megatron.core import parallel_state

    from ringmem.integrations.megatron import cpu_shim

    cpu_shim()
    parallel_state.initialize_model_parallel(1, 1, context_parallel_size=world)


def _compare(got, ref, base, tag: str) -> list[str]:
    fails = [check_close(f"{tag} loss", got[0], ref[0], base[0], torch.float32, FACTOR_LOSS)]
    fails += [check_close(f"{tag} grad {n}", got[1][n], ref[1][n], base[1][n], torch.float32,
                          FACTOR_GRAD) for n in ref[1]]
    return [f for f in fails if f]


def _baseline(rank: int, world: int, path: str) -> None:
    """CP=1: float64 dense truth, float32 dense baseline, and ringmem's float32 result."""
    _setup(world)
    out, fails = {}, []
    for case in CASES:
        packed = case == "packed"
        ref = _loss_and_grads(_model(1, True, case), packed, 0, 1, torch.float64)
        base = _loss_and_grads(_model(1, True, case), packed, 0, 1, torch.float32)
        got = _loss_and_grads(_model(1, False, case), packed, 0, 1, torch.float32)
        fails += _compare(got, ref, base, f"CP=1 {case}")
        out[case] = (ref, base)
    torch.save(out, path)
    assert not fails, "\n".join(fails)


def _context_parallel(rank: int, world: int, path: str, ulysses: int = 1) -> None:
    _setup(world)
    saved = torch.load(path)
    fails = []
    for case in CASES:
        model = _model(world, False, case, ulysses)
        if ulysses > 1:  # the option reaches every layer's core attention
            cores = [m for m in model.modules() if isinstance(m, RingmemCoreAttention)]
            assert cores and all(m.ulysses == ulysses for m in cores), ulysses
        got = _loss_and_grads(model, case == "packed", rank, world, torch.float32)
        fails += _compare(got, *saved[case], f"CP={world} ulysses={ulysses} rank={rank} {case}")
    assert not fails, "\n".join(fails)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("megatron") / "baseline.pt")
    spawn(_baseline, 1, path)
    return path


@pytest.mark.parametrize("world", [2, 3, 4])
def test_gpt_loss_and_grads_match_cp1(baseline: str, world: int) -> None:
    spawn(_context_parallel, world, baseline)


def test_gpt_ulysses_matches_cp1(baseline: str) -> None:
    """CP=2 as one Ulysses group (ringmem_layer_spec(ulysses=2)): the same loss and grads."""
    spawn(_context_parallel, 2, baseline, 2)


def test_thd_offsets_map_megatron_padding() -> None:
    from ringmem.integrations.megatron import thd_cu_seqlens

    def params(real, padded=None, kv=None):
        t = lambda x: None if x is None else torch.tensor(x, dtype=torch.int32)
        return types.SimpleNamespace(cu_seqlens_q=t(real), cu_seqlens_kv=t(kv or real),
                                     cu_seqlens_q_padded=t(padded),
                                     cu_seqlens_kv_padded=t(padded))

    # padding equal to ringmem's own (next multiple of 2*CP): the real offsets
    assert thd_cu_seqlens(params([0, 13, 21], [0, 16, 24]), 12, 2, True) == [0, 13, 21]
    # more padding than that: causal hides it behind the real tokens
    assert thd_cu_seqlens(params([0, 9, 17], [0, 16, 24]), 12, 2, True) == [0, 16, 24]
    assert thd_cu_seqlens(params([0, 8, 16]), 8, 2, False) == [0, 8, 16]
    with pytest.raises(ValueError, match="cannot be hidden from non-causal"):
        thd_cu_seqlens(params([0, 9, 17], [0, 16, 24]), 12, 2, False)
    with pytest.raises(ValueError, match="multiple of 4"):
        thd_cu_seqlens(params([0, 6, 14]), 7, 2, True)
    with pytest.raises(ValueError, match="hold 16 tokens"):
        thd_cu_seqlens(params([0, 8, 16]), 4, 2, True)
    with pytest.raises(ValueError, match="must equal its query offsets"):
        thd_cu_seqlens(params([0, 8, 16], kv=[0, 4, 16]), 8, 2, True)


def _launcher() -> types.ModuleType:
    """ringmem/launch/train_megatron.py by path (an installed ringmem may be another
    checkout's)."""
    spec = importlib.util.spec_from_file_location(
        "train_megatron_launcher", ROOT / "ringmem" / "launch" / "train_megatron.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("packed", [True, False])
def test_demo_data_does_not_depend_on_cp(packed: bool) -> None:
    """The launcher's batch at step s is a function of (seed, step, DP rank): CP=3's, its
    pads removed, is CP=1's row for row (the pads only align documents to 2 * cp)."""
    launcher = _launcher()
    cfg = launcher.TrainMegatronConfig(seq_len=96, batch=2, packed=packed, docs=4)
    keys = ("tokens", "labels", "loss_mask", "position_ids")
    for step in (1, 7):
        for dp_rank in (0, 1):
            one, real1, pad1 = launcher.global_batch(cfg, step, dp_rank, 1)
            three, real3, pad3 = launcher.global_batch(cfg, step, dp_rank, 3)
            if not packed:
                assert all(torch.equal(one[k], three[k]) for k in keys)
                continue
            assert real1 == real3 == pad1 and real1[-1] == cfg.batch * cfg.seq_len
            assert all((b - a) % 6 == 0 for a, b in zip(pad3, pad3[1:]))
            keep = torch.cat([torch.arange(p, p + b - a)
                              for p, a, b in zip(pad3, real3, real3[1:])])
            for k in keys:
                assert torch.equal(three[k][:, keep], one[k]), (step, dp_rank, k)
            assert three["loss_mask"].sum() == one["loss_mask"].sum()
    other = launcher.global_batch(cfg, 2, 0, 1)[0]["tokens"]
    assert not torch.equal(other, launcher.global_batch(cfg, 1, 0, 1)[0]["tokens"])


def test_unsupported_options_are_refused() -> None:
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ringmem.integrations.megatron import RingmemCoreAttention, ringmem_layer_spec

    def make(**kw):
        cfg = dict(num_layers=1, hidden_size=16, num_attention_heads=2,
                   attention_dropout=0.0, use_cpu_initialization=True)
        args = dict(layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
        cfg.update(kw.pop("config", {}))
        args.update(kw)
        return RingmemCoreAttention(TransformerConfig(**cfg), **args)

    q = torch.randn(4, 1, 2, 8)
    with pytest.raises(ValueError, match="attention_dropout=0.0"):
        make(config={"attention_dropout": 0.1})
    with pytest.raises(ValueError, match="self-attention only"):
        make(attention_type="cross")
    with pytest.raises(ValueError, match="cp_comm_type='a2a'"):
        make(cp_comm_type="a2a")
    with pytest.raises(ValueError, match="mask types"):
        make(attn_mask_type=AttnMaskType.arbitrary)
    with pytest.raises(ValueError, match="needs packed sequences"):
        make(attn_mask_type=AttnMaskType.padding_causal)(q, q, q, None)
    with pytest.raises(ValueError, match="attention_bias"):
        make()(q, q, q, None, attention_bias=torch.zeros(1))
    with pytest.raises(ValueError, match="KV-cache inference"):
        make()(q[:2], q, q, None)
    with pytest.raises(ValueError, match="multi_latent_attention"):
        ringmem_layer_spec(multi_latent_attention=True)
    out = make()(q, q, q, None)  # one process: plain attention
    assert out.shape == (4, 1, 16)


def test_import_ringmem_does_not_import_megatron() -> None:
    code = ("import sys, ringmem, ringmem.integrations; "
            "assert 'megatron' not in sys.modules, 'megatron imported'")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr


def test_train_launcher_smoke() -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "ringmem" / "launch" / "train_megatron.py"), "--config",
           "configs/train_megatron_tiny.toml", "--steps", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    losses = [float(l.split("loss ")[1].split()[0]) for l in res.stdout.splitlines()
              if l.startswith("step ")]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), res.stdout


@pytest.mark.parametrize("args,world,message", [
    (["--dp", "3"], 4, "mesh dp=3 x cp=1 x tp=1 x pp=1 = 3 ranks, but torchrun started 4"),
    (["--seq-len", "62"], 2, "seq_len=62 must be divisible by 2*cp=4"),
    (["ulysses = 4"], 2, "ulysses=4 does not divide the context-parallel degree cp=2"),
    (["ulysses = 3"], 3, "ulysses=3 must divide heads=4"),
    (["ulysses = 0"], 2, "ulysses must be an int >= 1 or 'auto', got 0"),
])
def test_train_launcher_refuses_bad_mesh(args: list[str], world: int, message: str,
                                         tmp_path) -> None:
    config = ROOT / "configs" / "train_megatron_tiny.toml"
    if "=" in args[0]:  # a TOML line in place of the tiny config's own
        line, args = args[0], args[1:]
        key = line.split("=")[0]
        lines = [x for x in config.read_text().splitlines() if not x.startswith(key)]
        config = tmp_path / "tiny.toml"
        config.write_text("\n".join([*lines, line]) + "\n")
    cmd = [sys.executable, str(ROOT / "ringmem" / "launch" / "train_megatron.py"), "--config",
           str(config), *args]
    env = {**os.environ, "WORLD_SIZE": str(world)}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    lines = res.stderr.strip().splitlines()  # one line, nothing built
    assert res.returncode != 0 and len(lines) == 1, res.stderr[-2000:]
    assert lines[0].startswith("train_megatron: ") and message in lines[0], lines
