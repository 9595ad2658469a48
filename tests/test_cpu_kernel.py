"""The compiled CPU decode kernel (`kernels/cpu/decode.cpp` through `backends/cpu_backend.py`)
against a float64 reference: every length around the tile and SIMD widths, page layouts
(empty runs, one-token runs, many short runs), per-head runs, GQA group sizes, head dims,
dtypes, instruction-set paths and thread counts; per-key logits; the softcap; and the
torch path where the kernel cannot be built."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from ringmem.backends import get_backend
from ringmem.partial import attend

from _tolerance import check_close


@pytest.fixture(scope="module")
def ext():
    be = get_backend("cpu", torch.device("cpu"), torch.float32, 64)
    mod = be.kernel()
    if mod is None:
        import shutil
        if shutil.which("c++") and shutil.which("ninja"):  # a build that should have worked
            pytest.fail("the CPU kernel did not build though a compiler and ninja are here: "
                        "see the log line")
        pytest.skip("no C++ compiler or ninja here: the kernel cannot be built")
    return mod


def _pools(hkv: int, n: int, d: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(hkv, n, d, generator=g).to(dtype)
    v = torch.randn(hkv, n, d, generator=g).to(dtype)
    return k, v


def _ref(q, k, v, runs_per_head, scale, softcap=0.0):
    """float64 out [Hq, D], lse [Hq], scores per head [G, n_h]."""
    hkv = k.shape[0]
    hq, d = q.shape
    g = hq // hkv
    outs, lses, scores = [], [], []
    for h, runs in enumerate(runs_per_head):
        idx = (torch.cat([torch.arange(a, b) for a, b in runs]) if runs
               else torch.zeros(0, dtype=torch.long))
        s = q[h * g:(h + 1) * g].double() * scale @ k[h, idx].double().T
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        scores.append(s)
        if idx.numel() == 0:
            outs.append(torch.zeros(g, d, dtype=torch.float64))
            lses.append(torch.full((g,), float("-inf"), dtype=torch.float64))
            continue
        lses.append(torch.logsumexp(s, -1))
        outs.append(torch.softmax(s, -1) @ v[h, idx].double())
    return torch.cat(outs), torch.cat(lses), scores


def _check(got, q, k, v, runs_per_head, scale, dtype, softcap=0.0) -> None:
    ro, rl, _ = _ref(q, k, v, runs_per_head, scale, softcap)
    base = attend(q, k, v, scale, head_runs=runs_per_head, softcap=softcap)  # the torch path
    seen = torch.isfinite(rl)
    for name, a, r, b in (("out", got.out, ro, base.out), ("lse", got.lse[seen], rl[seen],
                                                            base.lse[seen])):
        msg = check_close(name, a, r, b, dtype if name == "out" else torch.float32)
        assert msg is None, msg
    assert torch.equal(got.lse[~seen], rl[~seen].float())  # -inf where no key
    assert torch.all(got.out[~seen] == 0)


LAYOUTS = {
    "one run": lambda n: [(0, n)],
    "empty and one-token runs": lambda n: [(0, 0), (3, 4), (4, 4), (7, n)],
    "many short runs": lambda n: [(i, min(n, i + 5)) for i in range(0, n, 9)],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 3, 15, 16, 17, 1023, 1025, 2047, 2049, 4100])
def test_kernel_matches_float64_at_every_length(ext, dtype, n) -> None:
    be = get_backend("cpu", torch.device("cpu"), dtype, 64)
    hkv, g, d = 2, 4, 64
    k, v = _pools(hkv, n, d, dtype, seed=n)
    q = torch.randn(hkv * g, d, generator=torch.Generator().manual_seed(n + 1)).to(dtype)
    got = be.decode(q, k, v, [(0, n)], d ** -0.5)
    _check(got, q, k, v, [[(0, n)]] * hkv, d ** -0.5, dtype)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("g,d", [(1, 64), (3, 80), (4, 128), (8, 96), (8, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_page_layouts_group_sizes_and_head_dims(ext, layout, g, d, dtype) -> None:
    be = get_backend("cpu", torch.device("cpu"), dtype, d)
    hkv, n = 2, 1300
    k, v = _pools(hkv, n, d, dtype)
    q = torch.randn(hkv * g, d).to(dtype)
    runs = LAYOUTS[layout](n)
    _check(be.decode(q, k, v, runs, 1 / math.sqrt(d)), q, k, v, [runs] * hkv,
           1 / math.sqrt(d), dtype)


@pytest.mark.parametrize("dtype,g", [(torch.float32, 2), (torch.bfloat16, 4)])
def test_per_head_runs_softcap_and_logits_equal_the_torch_path(ext, dtype, g) -> None:
    """Heads holding different tokens (after per-head eviction), a Gemma-2 softcap, and
    the per-key logits the H2O / TOVA / A2SF scorers read, in the torch path's order
    (bf16 with 4 rows: the 4-row x 4-key score blocks)."""
    be = get_backend("cpu", torch.device("cpu"), dtype, 64)
    hkv, d, n = 3, 64, 900
    k, v = _pools(hkv, n, d, dtype)
    q = torch.randn(hkv * g, d).to(dtype)
    per_head = [[(0, 10), (20, 600)], [], [(5, 6), (100, 900)]]
    mine: list = []
    got = be.decode(q, k, v, [], 0.125, head_runs=per_head, logits=mine, softcap=30.0)
    _check(got, q, k, v, per_head, 0.125, dtype, softcap=30.0)
    theirs: list = []
    attend(q, k, v, 0.125, head_runs=per_head, logits=theirs, softcap=30.0)
    _, _, ref = _ref(q, k, v, per_head, 0.125, softcap=30.0)
    assert [t.shape for t in mine] == [t.shape for t in theirs] == [r.shape for r in ref]
    for a, b, r in zip(mine, theirs, ref):
        if r.numel() == 0:  # the head with no tokens
            continue
        msg = check_close("logits", a, r, b, dtype)
        assert msg is None, msg


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_instruction_set_path_and_thread_count(ext, dtype) -> None:
    """The paths this CPU has (scalar always) agree with float64; the result does not depend
    on the thread count (tiles are merged in a fixed order)."""
    hkv, g, d, n = 2, 4, 128, 3000
    k, v = _pools(hkv, n, d, dtype)
    q = torch.randn(hkv * g, d).to(dtype)
    qs = (q.float() * d ** -0.5).contiguous()
    bounds = torch.tensor([[h * n + lo, h * n + hi] for h in range(hkv)
                           for lo, hi in ((0, 1000), (1100, 3000))])  # absolute rows
    offsets = torch.tensor([0, 2, 4])
    per_head = [[(0, 1000), (1100, 3000)]] * hkv
    best = {"scalar": 0, "avx2": 1, "avx512": 2, "avx512_bf16": 3}[ext.isa()]
    threads = torch.get_num_threads()
    try:
        for cap in range(best + 1):
            outs = []
            for t in (1, 2):
                torch.set_num_threads(t)
                o, lse = ext.decode(qs, k, v, bounds, offsets, 0.0, False, 256, cap)
                outs.append((o, lse))
            assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
            from ringmem.partial import Partial
            _check(Partial(*outs[0]), q, k, v, per_head, d ** -0.5, dtype)
    finally:
        torch.set_num_threads(threads)


def test_without_a_compiler_decode_takes_the_torch_path_and_says_so(monkeypatch,
                                                                    caplog) -> None:
    from torch.utils import cpp_extension

    from ringmem.backends.cpu_backend import CpuBackend

    def no_compiler(*a, **kw):
        raise RuntimeError("Error building extension: c++: command not found")
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    be = CpuBackend()
    with caplog.at_level(logging.WARNING, logger="ringmem"):
        assert be.kernel() is None
    assert "compiled CPU decode kernel is unavailable" in caplog.text
    assert "command not found" in caplog.text
    k, v = _pools(1, 50, 32, torch.float32)
    q = torch.randn(2, 32)
    got = be.decode(q, k, v, [(0, 50)], 0.2)
    want = attend(q, k, v, 0.2, runs=[(0, 50)])
    assert torch.equal(got.out, want.out) and torch.equal(got.lse, want.lse)


def test_non_finite_queries_follow_the_torch_paths_rule(ext) -> None:
    be = get_backend("cpu", torch.device("cpu"), torch.float32, 32)
    k, v = _pools(1, 40, 32, torch.float32)
    q = torch.randn(2, 32)
    q[1, 3] = float("nan")
    got = be.decode(q, k, v, [(0, 40)], 0.2)
    want = attend(q, k, v, 0.2, runs=[(0, 40)])
    assert torch.equal(got.out.isnan(), want.out.isnan()) and got.out[1].isnan().all()


@pytest.mark.parametrize("name", ["paged", "auto", "cpu"])
def test_the_caches_decode_on_cpu_is_the_kernel(ext, name: str) -> None:
    from ringmem.cache import CacheConfig, ShardedKVCache
    cache = ShardedKVCache(CacheConfig(num_layers=1, q_heads=4, kv_heads=2, head_dim=64,
                                       capacity=64, page_size=16, decode_backend=name))
    assert cache.decoder.name == "cpu"


def test_the_backend_pickles_after_its_kernel_is_built(ext) -> None:
    """A cache sent to spawned ranks carries its decoder; the built module does not pickle,
    so a copy loads it again on first use."""
    import pickle
    be = get_backend("cpu", torch.device("cpu"), torch.float32, 32)
    assert be.kernel() is not None
    copy = pickle.loads(pickle.dumps(be))
    k, v = _pools(1, 30, 32, torch.float32)
    q = torch.randn(2, 32)
    a, b = be.decode(q, k, v, [(0, 30)], 0.2), copy.decode(q, k, v, [(0, 30)], 0.2)
    assert torch.equal(a.out, b.out) and torch.equal(a.lse, b.lse)
