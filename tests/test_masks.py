"""Block pieces cover exactly the dense mask (fuzzed with hypothesis), skipped blocks cost
nothing (CommStats and the backend's work equal plan()'s prediction, far below dense), and
bad cu_seqlens / window / softcap / sinks are refused by name on every rank."""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ringmem
from ringmem.layouts import positions
from ringmem.masking import Mask, band_bias, band_mask, block_pieces, pieces_mask, run_pieces
from ringmem.packing import padded_len
from ringmem.reference import dense_mask
from ringmem.testing import spawn


def _dense_block(layout, world, qr, kr, n, mask, cu):
    """The [n, n] block of the dense mask (in layout coordinates) between two ranks."""
    total = n * world
    if layout == "document":  # map padded positions back to real tokens (pads: none)
        from ringmem.packing import source_index
        src = source_index(cu, world, total)
        full = dense_mask(cu[-1], causal=mask.causal, window=mask.window, cu_seqlens=cu)
        qs, ks = (src[positions(layout, r, world, n, cu)] for r in (qr, kr))
        ok = (qs >= 0)[:, None] & (ks >= 0)[None, :]
        return full[qs.clamp(min=0)][:, ks.clamp(min=0)] & ok
    full = dense_mask(total, causal=mask.causal, window=mask.window, cu_seqlens=cu)
    qp, kp = (positions(layout, r, world, n) for r in (qr, kr))
    return full[qp][:, kp]


@st.composite
def _problems(draw):
    world = draw(st.integers(1, 4))
    layout = draw(st.sampled_from(ringmem.LAYOUTS))
    causal = draw(st.booleans())
    left = draw(st.sampled_from([-1, 0, 1, 3, 9]))
    right = -1 if causal else draw(st.sampled_from([-1, 0, 2]))
    if layout == "document":
        lengths = draw(st.lists(st.integers(1, 11), min_size=1, max_size=5))
        cu = (0, *itertools.accumulate(lengths))
        n = padded_len((cu,), world) // world
    else:
        chunks = 2 * world if layout == "zigzag" and world > 1 else world
        total = chunks * draw(st.integers(1, 5))
        n = total // world
        cuts = draw(st.lists(st.integers(1, max(1, total - 1)), max_size=4, unique=True))
        cu = (0, *sorted(c for c in cuts if 0 < c < total), total)
        if draw(st.booleans()) and left == -1:
            cu = None
    return world, layout, n, Mask(causal, (left, right), None if cu is None else (cu,)), cu


@settings(max_examples=150, deadline=None)
@given(_problems())
def test_pieces_cover_the_dense_mask(problem) -> None:
    world, layout, n, mask, cu = problem
    for qr, kr in itertools.product(range(world), repeat=2):
        pieces = block_pieces(layout, world, qr, n, kr, n, mask)
        assert torch.equal(pieces_mask(pieces, n, n), _dense_block(layout, world, qr, kr, n,
                                                                   mask, cu))
        if mask.window[0] < 0:  # no window: only what every backend runs natively
            for p in pieces:
                assert p.lo is None and p.hi in (None, 0)
                assert p.hi is None or p.q.stop - p.q.start == p.k.stop - p.k.start


@st.composite
def _edges(draw):
    """Non-decreasing key runs [s_i, e_i) built from runs of equal steps (0-3), the shape
    run_pieces walks by runs; empty rows (e <= s) included."""
    s, e = [draw(st.integers(0, 4))], []
    e.append(s[0] + draw(st.integers(-2, 5)))
    for _ in range(draw(st.integers(0, 8))):
        ds, de = draw(st.integers(0, 3)), draw(st.integers(0, 3))
        for _ in range(draw(st.integers(1, 9))):
            s.append(s[-1] + ds)
            e.append(e[-1] + de)
    return torch.tensor(s), torch.tensor(e), draw(st.booleans())


@settings(max_examples=300, deadline=None)
@given(_edges())
def test_run_pieces_cover_the_runs_once(case) -> None:
    s, e, bands = case
    n, m = s.numel(), int(e.max().clamp(min=1))
    pieces = run_pieces(s, e, bands=bands)
    keys = torch.arange(m)
    want = (keys[None, :] >= s[:, None]) & (keys[None, :] < e[:, None])
    assert torch.equal(pieces_mask(pieces, n, m), want)
    # each pair once: the pieces' masks do not overlap
    assert sum(int(pieces_mask((p,), n, m).sum()) for p in pieces) == int(want.sum())
    for p in pieces:
        if not bands:
            assert p.lo is None and p.hi in (None, 0)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "stripe"])
def test_plain_causal_blocks_go_by_rank_order(layout) -> None:
    """block_pieces answers every plain causal block of these layouts from three (query
    rank before / at / after the key rank): each equals the block computed for its ranks."""
    from ringmem.masking import _block_pieces
    for world, fold, causal in itertools.product((2, 3, 5), (1, 2, 3), (True, False)):
        n = 2 * fold * 3
        mask = Mask(causal=causal)
        for qr, kr in itertools.product(range(world), repeat=2):
            got = block_pieces(layout, world, qr, n, kr, n, mask, fold)
            assert got == _block_pieces(layout, world, qr, n, kr, n, mask, fold), (
                world, fold, qr, kr)


def test_band_mask() -> None:
    assert torch.equal(band_mask((None, 0), 3, 3), torch.ones(3, 3, dtype=torch.bool).tril())
    assert torch.equal(band_mask((-1, 0), 3, 3).int(),
                       torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 1]]))


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 9), st.integers(0, 9), st.sampled_from([None, -5, -2, -1, 0, 1, 3]),
       st.sampled_from([None, -3, -1, 0, 2, 6]),
       st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
def test_band_bias_is_the_band_mask(n, m, lo, hi, dtype) -> None:
    """The Toeplitz-view bias equals -inf outside `band_mask`, 0 inside, element for
    element (any shape, empty bands and empty blocks included), contiguous."""
    got = band_bias((lo, hi), n, m, dtype)
    keep = band_mask((lo, hi), n, m)
    assert got.shape == (n, m) and got.dtype == dtype and got.is_contiguous()
    assert torch.equal(got, torch.zeros(n, m, dtype=dtype).masked_fill(~keep, float("-inf")))


# --- skipping is real: counted work and bytes equal plan()'s, far below dense -------------

def _counted(rank: int, world: int, kw: dict, check: dict) -> None:
    from ringmem.backends import _REGISTRY
    from ringmem.backends.torch_ref import TorchBackend

    class Counting(TorchBackend):
        pairs = 0

        def fwd(self, q, k, v, scale, causal, **extra):
            Counting.pairs += int(band_mask(causal, q.shape[1], k.shape[1]).sum()) * q.shape[0]
            return super().fwd(q, k, v, scale, causal, **extra)

    _REGISTRY["torch"] = Counting()
    b, s, h, d = 2, kw.pop("local"), 2, 8
    q, k, v = (torch.randn(b, s, h, d) for _ in range(3))
    stats = ringmem.CommStats()
    ringmem.ring_attention(q, k, v, backend="torch", stats=stats, **kw)
    plan = ringmem.plan((b, s, h, d), (b, s, h, d), world=world, dtype=torch.float32,
                        device_type="cpu", causal=kw["causal"], layout=kw["layout"],
                        window=kw.get("window", (-1, -1)), cu_seqlens=kw.get("cu_seqlens"))
    est = plan.schedules[kw["schedule"]]
    sent = {i: v for i, v in stats.per_step("fwd").items() if v != (0, 0)}
    assert sent == {i: v for i, v in enumerate(est.steps["fwd"][rank]) if v != (0, 0)}
    assert Counting.pairs == sum(est.pairs[rank])
    dense = ringmem.plan((b, s, h, d), (b, s, h, d), world=world, dtype=torch.float32,
                         device_type="cpu", causal=True, layout=kw["layout"] if
                         kw["layout"] != "document" else "zigzag").schedules[kw["schedule"]]
    assert est.bytes("fwd") <= check["bytes"] * dense.bytes("fwd"), (est.bytes("fwd"),
                                                                      dense.bytes("fwd"))
    assert sum(map(sum, est.pairs)) <= check["pairs"] * sum(map(sum, dense.pairs))


@pytest.mark.parametrize("schedule", ["kv", "q"])
def test_skipped_blocks_cost_nothing(schedule: str) -> None:
    world = 4
    # a small causal window on the contiguous layout: one hop, ~window/S of the pairs
    spawn(_counted, world, dict(local=32, causal=True, layout="contiguous",
                                schedule=schedule, window=(3, -1)),
          dict(bytes=0.40, pairs=0.15))
    # packed: documents that each sit inside one rank's shard under "contiguous"
    cu = [0, 32, 64, 96, 128]
    spawn(_counted, world, dict(local=32, causal=True, layout="contiguous",
                                schedule=schedule, cu_seqlens=cu),
          dict(bytes=0.0, pairs=0.35))


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "stripe"])
def test_narrow_band_is_tiled_exactly(layout: str) -> None:
    """Long shards, narrow windows: tiles of rows with only the keys they can see, still
    exactly the dense mask, and the work stays near rows x (window + tile)."""
    world, n = 2, 600
    for window, causal in (((5, -1), True), ((70, -1), True), ((3, 9), False)):
        mask = Mask(causal, window, None)
        full = dense_mask(n * world, causal=causal, window=window)
        for qr, kr in itertools.product(range(world), repeat=2):
            pieces = block_pieces(layout, world, qr, n, kr, n, mask)
            want = full[positions(layout, qr, world, n)][:, positions(layout, kr, world, n)]
            assert torch.equal(pieces_mask(pieces, n, n), want)
            work = sum((p.q.stop - p.q.start) * (p.k.stop - p.k.start) for p in pieces)
            assert work <= n * (2 * 64 + 2 * sum(max(w, 0) for w in window) + 2) + 4 * 64 * 64


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
def test_narrow_band_ring_one_process(backend: str) -> None:
    from ringmem.reference import masked_reference
    q, k, v = (torch.randn(1, 512, 2, 8, dtype=torch.float64) for _ in range(3))
    keep = dense_mask(512, causal=True, window=(7, -1))
    ref, _ = masked_reference(q, k, v, keep)
    base, _ = masked_reference(q.float(), k.float(), v.float(), keep)
    got = ringmem.ring_attention(q.float(), k.float(), v.float(), window=(7, -1),
                                 backend=backend, layout="contiguous")
    err, base_err = (got.double() - ref).abs().max(), (base.double() - ref).abs().max()
    assert err <= 4 * base_err + 1e-6, (err, base_err)
