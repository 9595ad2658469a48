"""Triton kernels with band masks (lo <= (k_offset + j) - (q_offset + i) <= hi) and the
logit softcap, against float64; and the ring on the Triton backend with windows.

`cpu` runs the kernels under TRITON_INTERPRET=1 at tiny sizes in fp32 and fp16; `cuda`
(marked gpu) adds bf16. Tolerances come from a same-dtype autograd baseline
(`_tolerance.check_close`), as in test_kernels.py.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import ringmem  # noqa: E402
from ringmem.backends.torch_ref import TorchBackend  # noqa: E402
from ringmem.kernels.attention import attention_fwd  # noqa: E402
from ringmem.kernels.backward import attention_bwd  # noqa: E402
from ringmem.kernels.band import band_args  # noqa: E402
from ringmem.kernels.configs import (  # noqa: E402
    VARIANT_TILES,
    Tile,
    arch_of,
    autotune_configs,
    prune_for,
    tiles_for,
    variant,
)
from ringmem.testing import spawn  # noqa: E402

from _devices import INTERPRET, device_dtypes, devices, half_dtype  # noqa: E402
from _tolerance import check_close, outputs_and_grads  # noqa: E402

pytestmark = pytest.mark.triton

# (B, Sq, Sk, Hq, Hkv, D, (lo, hi), q_offset, k_offset)
CASES = {
    "lo only": (1, 21, 30, 2, 2, 16, (-6, None), 0, 0),
    "hi only, positive": (1, 30, 40, 2, 1, 16, (None, 9), 0, 0),
    "window gqa 4:1": (2, 37, 41, 4, 1, 16, (-9, 0), 0, 0),
    "window, queries later": (1, 24, 40, 4, 2, 24, (-12, 0), 20, 0),
    "both, negative offset": (1, 18, 22, 2, 2, 16, (-4, 2), -5, 3),
    "rows outside the block": (1, 20, 12, 4, 1, 16, (-3, 0), 0, 0),
    "empty band": (1, 9, 11, 2, 2, 16, (3, 1), 0, 0),
    "skips key tiles": (1, 64, 96, 2, 2, 16, (-10, 4), 0, 0),
    # 16 x 16 tiles: the last query that sees key tile 0 (token 32) starts a row tile; above,
    # the first that sees key tile 1 (token 7) ends one
    "window 18, tile edges": (1, 50, 50, 2, 2, 16, (-17, 0), 0, 0),
}
SMALL = Tile(16, 16, 4, 2)  # several row and key tiles per program: the loop bounds


def banded_attention(q, k, v, scale, band, q_off, k_off, softcap):
    """Dense attention with the band on absolute positions and the softcap, in q's dtype
    (the autograd baseline, or the float64 reference)."""
    g = q.shape[2] // k.shape[2]
    kx, vx = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    s = torch.einsum("bihd,bjhd->bhij", q, kx) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    diff = ((k_off + torch.arange(k.shape[1]))[None, :]
            - (q_off + torch.arange(q.shape[1]))[:, None]).to(q.device)
    keep = torch.ones_like(diff, dtype=torch.bool)
    if band[0] is not None:
        keep &= diff >= band[0]
    if band[1] is not None:
        keep &= diff <= band[1]
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s.float() if s.dtype != torch.float64 else s, -1)
    shift = torch.where(torch.isneginf(lse), 0, lse)[..., None]
    p = torch.exp(s.to(lse.dtype) - shift).to(q.dtype)
    return torch.einsum("bhij,bjhd->bihd", p, vx), lse


def _check(case: str, dtype: torch.dtype, device: str, softcap: float,
           tiles: dict[str, Tile] | None = None, scale: float = 0.3) -> None:
    """Forward and backward of one case against float64, tiles forced where given."""
    tiles = tiles or {}
    b, sq, sk, hq, hkv, d, band, qo, ko = CASES[case]
    g = torch.Generator().manual_seed(3)
    q = torch.randn(b, sq, hq, d, generator=g).to(device, dtype)
    k, v = (torch.randn(b, sk, hkv, d, generator=g).to(device, dtype) for _ in range(2))
    dout = torch.randn(b, sq, hq, d, generator=g).to(device, dtype)
    fn = lambda *t: banded_attention(*t, scale, band, qo, ko, softcap)
    ref = outputs_and_grads(fn, q.double(), k.double(), v.double(), dout.double())
    base = outputs_and_grads(fn, q, k, v, dout)
    out, lse = attention_fwd(q, k, v, scale, band, qo, ko, softcap=softcap,
                             tile=tiles.get("fwd"))
    grads = attention_bwd(dout, q, k, v, out, lse, scale, band, qo, ko, softcap=softcap,
                          dkdv_tile=tiles.get("dkdv"), dq_tile=tiles.get("dq"))
    empty = torch.isneginf(ref[1])
    assert torch.equal(torch.isneginf(lse), empty), "rows that see no key differ"
    assert torch.equal(out.transpose(1, 2)[empty], torch.zeros_like(out.transpose(1, 2)[empty]))
    assert all(torch.isfinite(x).all() for x in (out, *grads)), "nan or inf"
    fails = [check_close("out", out, ref[0], base[0], dtype)]
    if (~empty).any():
        fails.append(check_close("lse", lse[~empty], ref[1][~empty], base[1][~empty], dtype))
    factor = 4.0 if dtype == torch.float32 else 2.0  # as test_kernels: flash vs autograd
    fails += [check_close(n, gr, r, bs, dtype, factor)
              for n, gr, r, bs in zip(("dq", "dk", "dv"), grads, ref[2], base[2])]
    fails = [f for f in fails if f]
    assert not fails, "\n".join(fails)


def _params() -> list:
    return [pytest.param(dev, dt, c, cap, marks=p.marks, id=f"{p.id}-{c}-cap{cap:g}")
            for p in device_dtypes() for dev, dt in [p.values] for c in CASES
            for cap in (0.0, 3.0)]


@pytest.mark.parametrize("device, dtype, case, softcap", _params())
def test_band_forward_backward(device: str, dtype: torch.dtype, case: str,
                               softcap: float) -> None:
    _check(case, dtype, device, softcap)


@pytest.mark.parametrize("device, dtype", [pytest.param(*p.values, marks=p.marks, id=p.id)
                                           for p in device_dtypes()
                                           if p.values[1] != torch.bfloat16])
@pytest.mark.parametrize("case", ["skips key tiles", "window, queries later",
                                  "window 18, tile edges", "hi only, positive"])
def test_band_small_tiles(device: str, dtype: torch.dtype, case: str) -> None:
    """16 x 16 tiles: many row and key tiles, the band's tile bounds on both sides."""
    _check(case, dtype, device, 3.0, dict.fromkeys(("fwd", "dkdv", "dq"), SMALL))


def _variant_tiles() -> list:
    seen: dict[tuple, set[int]] = {}
    for (kernel, var), sets in VARIANT_TILES.items():
        for (arch, _, kind), tiles in sets.items():
            for t in tiles:
                seen.setdefault((kernel, var, kind, t), set()).add(arch)
    return [pytest.param(dev.values[0], *key, tuple(archs), marks=dev.marks,
                         id=f"{dev.values[0]}-{key[0]}-{key[1]}-{key[2]}-{key[3]}")
            for dev in devices() for key, archs in seen.items()]


@pytest.mark.parametrize("device, kernel, var, kind, tile, archs", _variant_tiles())
def test_every_variant_tile(device: str, kernel: str, var: str, kind: str, tile: Tile,
                            archs: tuple[int, ...]) -> None:
    """Each tile of the band / softcap variants' own sets, in its variant."""
    if device == "cuda" and arch_of(torch.device("cuda")) not in archs:
        pytest.skip(f"tile of sm_{archs} sets, not this GPU's")
    dtype = torch.float32 if kind == "fp32" else half_dtype(device)
    _check("skips key tiles", dtype, device, 3.0 if var == "cap" else 0.0, {kernel: tile})


def test_variant_sets_are_pruned_per_launch() -> None:
    """The autotuner's prune keeps the launch variant's set (CPU tensors: the sm_80 sets)."""
    def kept(kernel: str, **flags: bool) -> set[Tile]:
        cfgs = prune_for(kernel, "Q")(autotune_configs(kernel), {"Q": torch.empty(1)},
                                      BLOCK_D=128, **flags)
        return {Tile(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                for c in cfgs}
    base = set(tiles_for("fwd", 80, 128, torch.float32))
    assert kept("fwd", HAS_LO=False, SOFTCAP=False) == base
    assert kept("fwd", HAS_LO=True, SOFTCAP=False) == set(VARIANT_TILES["fwd", "band"][
        80, 128, "fp32"]) != base
    assert variant(False, False) == "base" and variant(True, False) == "band"
    assert variant(False, True) == variant(True, True) == "cap"
    assert tiles_for("dkdv", 90, 256, torch.float16, "cap") == (Tile(32, 32, 8, 2),)


@pytest.mark.parametrize("device", devices())
def test_large_softcap_is_accurate(device: str) -> None:
    """Gemma 2's attention cap (50): small |s / softcap|, where a naive tanh cancels."""
    _check("window gqa 4:1", torch.float32, device, 50.0)


def test_band_args_fold_offsets_and_drop_unreachable_edges() -> None:
    assert band_args(True, 0, 0, 8, 8) == (False, 0, True, 0)  # causal, as before
    assert band_args(False, 5, 0, 8, 8) == (False, 0, False, 0)
    assert band_args((-3, 0), 10, 4, 8, 8) == (True, 3, True, 6)  # shift q - k = 6
    assert band_args((None, 0), 20, 0, 8, 8) == (False, 0, False, 0)  # all keys visible
    assert band_args((-2, None), 0, 0, 8, 8) == (True, -2, False, 0)
    assert band_args((-2, 0), -2**40, 0, 8, 8) == (False, 0, True, -8)  # empty: keys ahead
    assert band_args((-2, 0), 2**40, 0, 8, 8) == (True, 8, False, 0)  # empty: keys too old


def test_torch_backend_agrees_with_dense_reference() -> None:
    """The dense reference above is the torch backend's band semantics (offsets 0)."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, n, 2, 8, generator=g, dtype=torch.float64)
               for n in (9, 13, 13))
    out, lse = TorchBackend().fwd(q, k, v, 0.4, (-2, 3), softcap=2.0)
    ref, ref_lse = banded_attention(q, k, v, 0.4, (-2, 3), 0, 0, 2.0)
    assert (out - ref).abs().max() < 1e-12 and (lse - ref_lse).abs().max() < 1e-12


@pytest.mark.parametrize("device", devices())
def test_triton_backend_takes_bands_and_softcap(device: str) -> None:
    """The backend passes the band and the softcap (fp32 vs the torch backend, float64)."""
    from ringmem.backends.triton_backend import TritonBackend
    tb = TritonBackend()
    assert tb.unsupported(torch.device(device), torch.float32, 16, bands=True,
                          softcap=True) is None
    g = torch.Generator().manual_seed(5)
    q, k, v, dout = (torch.randn(1, n, h, 16, generator=g).to(device)
                     for n, h in ((11, 4), (14, 2), (14, 2), (11, 4)))
    for band in ((-3, 1), True, False):
        out, lse = tb.fwd(q, k, v, 0.3, band, softcap=2.0)
        grads = tb.bwd(dout, q, k, v, out, lse, 0.3, band, softcap=2.0)
        d64 = [t.double().cpu() for t in (dout, q, k, v)]
        ref_out, ref_lse = TorchBackend().fwd(*d64[1:], 0.3, band, softcap=2.0)
        ref = TorchBackend().bwd(*d64, ref_out, ref_lse, 0.3, band, softcap=2.0)
        for got, want in zip((out, lse, *grads), (ref_out, ref_lse, *ref)):
            assert (got.double().cpu() - want).abs().max() < 2e-5, band


# ------------------------------------------------------------------ ring, 2 gloo ranks
def _dense_reference(q, k, v, window, docs):
    """Causal attention, window (left, right) and documents (cu_seqlens) as a dense mask
    over global positions, float64; rows that see nothing: 0."""
    s = q.shape[1]
    pos = torch.arange(s)
    keep = pos[None, :] <= pos[:, None]
    keep &= pos[None, :] >= pos[:, None] - window[0]
    if docs is not None:
        doc = torch.bucketize(pos, torch.as_tensor(docs[1:]), right=True)
        keep &= doc[None, :] == doc[:, None]
    g = q.shape[2] // k.shape[2]
    kx, vx = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    sc = torch.einsum("bihd,bjhd->bhij", q, kx) * q.shape[-1] ** -0.5
    p = torch.softmax(sc.masked_fill(~keep, float("-inf")), -1)
    return torch.einsum("bhij,bjhd->bihd", p, vx)


def _ring_window(rank: int, world: int) -> None:
    fails = []
    for docs, dtype, schedule in ((None, torch.float32, "kv"), (None, torch.float32, "q"),
                                  ([0, 7, 16, 24], torch.float32, "kv"),
                                  (None, torch.float16, "kv")):
        g = torch.Generator().manual_seed(11)
        s, hq, hkv, d = 24, 4, 2, 16
        q, k, v, dout = (torch.randn(1, s, h, d, generator=g, dtype=torch.float64)
                         for h in (hq, hkv, hkv, hq))
        q, k, v, dout = (t.to(dtype) for t in (q, k, v, dout))

        def grads(fn, *t):
            leaves = [x.detach().clone().requires_grad_() for x in t]
            out = fn(*leaves)
            out.backward(dout.to(out.dtype) if out.shape == dout.shape else
                         ringmem.shard(dout, layout="contiguous").to(out.dtype))
            return [out.detach()] + [x.grad for x in leaves]

        ref = grads(lambda *t: _dense_reference(*t, (5, 0), docs), q.double(), k.double(),
                    v.double())
        base = grads(lambda *t: _dense_reference(*t, (5, 0), docs), q, k, v)
        sh = lambda t: ringmem.shard(t, layout="contiguous")
        got = grads(lambda *t: ringmem.ring_attention(
            *t, backend="triton", window=(5, 0), causal=True, layout="contiguous",
            cu_seqlens=docs, schedule=schedule), sh(q), sh(k), sh(v))
        for name, gg, r, bs in zip(("out", "dq", "dk", "dv"), got, ref, base):
            factor = 4.0 if dtype == torch.float32 and name != "out" else 2.0
            msg = check_close(name, gg, sh(r), sh(bs), dtype, factor)
            if msg:
                fails.append(f"rank {rank} docs={docs} {dtype} {schedule}: {msg}")
    assert not fails, "\n".join(fails)


@pytest.mark.skipif(not INTERPRET, reason="gloo ranks on CPU: needs the interpreter")
def test_ring_window_with_triton_backend() -> None:
    spawn(_ring_window, 2, timeout=300)
