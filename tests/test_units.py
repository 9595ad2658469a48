"""Single-process units: layouts, block pieces, lse merge, block backends."""
from __future__ import annotations

import pytest
import torch

import ringmem
from ringmem.backends import get_backend
from ringmem.layouts import PLAIN_LAYOUTS, global_permutation, positions, split_len
from ringmem.masking import block_pieces, pieces_mask
from ringmem.partial import Partial, merge
from ringmem.reference import reference_attention

WORLDS = [1, 2, 3, 4, 5]


@pytest.mark.parametrize("layout", PLAIN_LAYOUTS)
@pytest.mark.parametrize("world", WORLDS)
def test_positions_are_a_permutation(layout: str, world: int) -> None:
    local = 6
    perm = global_permutation(layout, world, local)
    assert torch.equal(perm.sort().values, torch.arange(world * local))
    for r in range(world):
        pos = positions(layout, r, world, local)
        assert torch.all(pos[1:] > pos[:-1]), "local positions must ascend"


def test_layout_positions_by_definition() -> None:
    assert positions("zigzag", 1, 4, 4).tolist() == [2, 3, 12, 13]  # chunks 1 and 6 of 8
    assert positions("stripe", 2, 4, 3).tolist() == [2, 6, 10]
    assert positions("contiguous", 2, 4, 3).tolist() == [6, 7, 8]


@pytest.mark.parametrize("layout", PLAIN_LAYOUTS)
def test_shard_single_process_is_identity(layout: str) -> None:
    x = torch.randn(2, 14, 3)
    assert torch.equal(ringmem.shard(x, layout=layout), x)
    assert torch.equal(ringmem.unshard(x, layout=layout), x)


@pytest.mark.parametrize("layout", PLAIN_LAYOUTS)
@pytest.mark.parametrize("world", WORLDS)
def test_pieces_cover_exactly_the_causal_mask(layout: str, world: int) -> None:
    local = 8
    for r in range(world):
        qpos = positions(layout, r, world, local)
        for s in range(world):
            pieces = block_pieces(layout, world, r, local, s, local, True)
            want = positions(layout, s, world, local)[None, :] <= qpos[:, None]
            assert torch.equal(pieces_mask(pieces, local, local), want)
            area = sum((p.q.stop - p.q.start) * (p.k.stop - p.k.start + (1 if p.causal else 0))
                       // (2 if p.causal else 1) for p in pieces)
            assert area == int(want.sum()), "pieces overlap"
            assert len(pieces) <= 2  # every layout needs at most one full + one causal piece
            for p in pieces:
                if p.causal:
                    assert p.q.stop - p.q.start == p.k.stop - p.k.start


def test_zigzag_balances_causal_work() -> None:
    world, local = 4, 8
    work = [sum(int(pieces_mask(block_pieces("zigzag", world, r, local, s, local, True),
                                local, local).sum()) for s in range(world))
            for r in range(world)]
    assert len(set(work)) == 1, work


def test_staircase_general_positions() -> None:
    from ringmem.masking import staircase_pieces
    qpos = torch.tensor([3, 4, 5, 9, 10, 20])
    kpos = torch.tensor([0, 4, 5, 6, 10, 11, 30])
    want = kpos[None, :] <= qpos[:, None]
    assert torch.equal(pieces_mask(staircase_pieces(qpos, kpos), 6, 7), want)


def test_split_len_errors() -> None:
    assert split_len("zigzag", 16, 4) == 4
    with pytest.raises(ValueError, match="multiple of 8"):
        split_len("zigzag", 12, 4)
    with pytest.raises(ValueError, match="multiple of 3"):
        split_len("stripe", 10, 3)
    with pytest.raises(ValueError, match="layout must be one of"):
        split_len("ring", 8, 2)


@pytest.mark.parametrize("chunks", [[5, 7], [1, 3, 8], [4, 4, 4]])
def test_lse_merge_equals_direct_softmax(chunks: list[int]) -> None:
    b, hq, d = 2, 3, 8
    q = torch.randn(b, 6, hq, d, dtype=torch.float64)
    k = torch.randn(b, sum(chunks), hq, d, dtype=torch.float64)
    v = torch.randn_like(k)
    full, full_lse = reference_attention(q, k, v, causal=False)
    outs, lses, start = [], [], 0
    for n in chunks:
        o, l = reference_attention(q, k[:, start:start + n], v[:, start:start + n], causal=False)
        outs.append(o)
        lses.append(l)
        start += n
    # a partial that saw no key at all (lse = -inf, out = 0) must be neutral
    outs.append(torch.zeros_like(full))
    lses.append(torch.full_like(full_lse, float("-inf")))
    out, lse = merge([Partial(o, l.transpose(1, 2)) for o, l in zip(outs, lses)])
    lse = lse.transpose(1, 2)
    assert (out - full).abs().max() < 1e-13 and (lse - full_lse).abs().max() < 1e-13


def test_merge_keeps_empty_rows_empty() -> None:
    out, lse = merge([Partial(torch.zeros(1, 2, 1, 4), torch.full((1, 2, 1), -float("inf")))])
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


@pytest.mark.parametrize("name", ["torch", "sdpa"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2), (3, 1)])
def test_backend_fwd_bwd_float64(name: str, causal: bool, hq: int, hkv: int) -> None:
    be = get_backend(name, torch.device("cpu"), torch.float64, 20)
    s_q, s_k = 9, 9 if causal else 13
    q = torch.randn(2, s_q, hq, 20, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, s_k, hkv, 20, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, s_k, hkv, 20, dtype=torch.float64, requires_grad=True)
    ref, ref_lse = reference_attention(q, k, v, causal=causal, softmax_scale=0.3)
    dout = torch.randn_like(ref)
    ref.backward(dout)
    out, lse = be.fwd(q.detach(), k.detach(), v.detach(), 0.3, causal)
    dq, dk, dv = be.bwd(dout, q.detach(), k.detach(), v.detach(), out, lse, 0.3, causal)
    for got, want in ((out, ref), (lse, ref_lse), (dq, q.grad), (dk, k.grad), (dv, v.grad)):
        assert got.shape == want.shape and (got - want).abs().max() < 1e-12


def test_auto_backend_choice() -> None:
    import importlib.util
    has_triton = importlib.util.find_spec("triton") is not None
    has_fa = importlib.util.find_spec("flash_attn") is not None
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # on CPU never the Triton interpreter, whatever the environment says
    assert get_backend("auto", cpu, torch.float32, 64).name == "sdpa"
    # CUDA: flash_attn, then triton, then sdpa (half types only), then the reference
    assert get_backend("auto", cuda, torch.float32, 64).name == ("triton" if has_triton
                                                                 else "torch")
    assert get_backend("auto", cuda, torch.bfloat16, 64).name == (
        "flash_attn" if has_fa else "triton" if has_triton else "sdpa")
    assert get_backend("auto", cuda, torch.float64, 64).name == "torch"
    with pytest.raises(ValueError, match="backend 'sdpa' cannot run"):
        get_backend("sdpa", torch.device("cuda"), torch.float32, 64)
