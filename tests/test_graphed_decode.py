"""GraphedDecode: fixed-shape decode steps for CUDA graphs, checked as far as a CPU allows.

Against float64 attention over each sequence's whole history (and against the eager
`decode` on a twin cache), mixed with eager steps and forks; the device step is one fixed
list of ops whatever the lengths and owners, with no host read (a dispatch-mode trace) and
traces once under `torch.compile(fullgraph=True)`; errors raise on every rank. Capture and
replay themselves need a GPU: `benchmarks/graphed_decode.py` (run by gpu_check.sh).
"""
from __future__ import annotations

import pytest
import torch
from test_cache import HKV, HQ, D, _bound, _cfg  # the cache tests' shapes and bound
from torch.utils._python_dispatch import TorchDispatchMode

from ringmem.cache import GraphedDecode, ShardedKVCache
from ringmem.eviction import EvictionPolicy
from ringmem.reference import masked_reference
from ringmem.testing import spawn

LAYERS = 2  # _cfg's num_layers


def _prefill(cache: ShardedKVCache, layer: int, seq: int, k, v) -> None:
    n, world = k.shape[1], cache.world
    padded = -(-n // world) * world
    q = torch.zeros(1, n, HQ, D, dtype=k.dtype)
    parts = [cache.shard_chunk(torch.cat([t, t.new_zeros(1, padded - n, *t.shape[2:])], 1))
             for t in (q, k, v)]
    cache.prefill_chunk(layer, *parts, seq=seq, n_valid=n)


def _graphed_matches(rank: int, world: int, merge: str, dtype: torch.dtype,
                     extras: bool) -> None:
    g = torch.Generator().manual_seed(7)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    cap = 5.0 if extras else None
    sinks = rnd(HQ).to(dtype) if extras else None
    caches = [ShardedKVCache(_cfg(merge=merge, dtype=dtype)) for _ in range(2)]
    dec = GraphedDecode(caches[1], softcap=cap, sinks=sinks, chunk=24)  # 3 chunks of 64
    hist = {(lay, s): [rnd(1, n, HKV, D).to(dtype).double() for _ in range(2)]
            for lay in range(LAYERS) for s, n in enumerate((11, 6))}
    for (lay, s), (k, v) in hist.items():
        for c in caches:
            _prefill(c, lay, s, k.to(dtype), v.to(dtype))
    fails = []
    for step in range(14):
        if step == 9:  # seq 1 becomes a copy of seq 0: shared pages, copied on write
            for c in caches:
                c.reset(1)
                c.fork(0, 1)
            for lay in range(LAYERS):
                hist[lay, 1] = [t.clone() for t in hist[lay, 0]]
        eager_step = step == 5  # the graphed cache takes one eager step: masks rebuilt
        if not eager_step:
            dec.plan()
        for lay in range(LAYERS):
            q, k, v = (rnd(2, 1, h, D).to(dtype) for h in (HQ, HKV, HKV))
            kw = dict(softcap=cap, sinks=sinks)
            want = caches[0].decode(lay, q, k, v, **kw)
            got = (caches[1].decode(lay, q, k, v, **kw) if eager_step
                   else dec.attend(lay, q, k, v))
            for s in range(2):
                hist[lay, s] = [torch.cat([h, x[s:s + 1].double()], 1)
                                for h, x in zip(hist[lay, s], (k, v))]
                qkv = (q[s:s + 1].double(), *hist[lay, s])
                keep = torch.ones(1, qkv[1].shape[1], dtype=torch.bool)
                ref, _ = masked_reference(*qkv, keep, softcap=cap,
                                          sinks=None if sinks is None else sinks.double())
                base, _ = masked_reference(*(t.to(dtype) for t in qkv), keep, softcap=cap,
                                           sinks=sinks)
                tol = _bound(ref, base, dtype)
                for name, out in (("graphed", got), ("eager", want)):
                    err = (out[s:s + 1].double() - ref).abs().max().item()
                    if not err <= tol:
                        fails.append(f"{name} step {step} layer {lay} seq {s}: err "
                                     f"{err:.2e} > {tol:.2e}")
    dec.check()
    for lay in range(LAYERS):  # the same tokens in the same slots as the eager twin
        a, b = caches[0].stores[lay], caches[1].stores[lay]
        for s in range(2):
            if a.runs(s) != b.runs(s) or a.lens[s] != b.lens[s]:
                fails.append(f"layer {lay} seq {s}: runs {a.runs(s)} vs {b.runs(s)}")
                continue
            for x, y in zip(a.view(s), b.view(s)):
                if not torch.equal(x, y):
                    fails.append(f"layer {lay} seq {s}: stored tokens differ")
            runs = torch.zeros(a.k.shape[1], dtype=torch.bool)
            for lo, hi in b.runs(s):
                runs[lo:hi] = True
            if not torch.equal(dec.member[lay][s], runs):
                fails.append(f"layer {lay} seq {s}: mask differs from the page runs")
        if caches[0].index.head_counts[lay] != caches[1].index.head_counts[lay]:
            fails.append(f"layer {lay}: counts differ")
    assert not fails, f"rank {rank}: " + "\n".join(fails[:8])


@pytest.mark.parametrize("world", [1, 2, 3])
def test_graphed_steps_match_float64_and_eager_decode(world: int) -> None:
    spawn(_graphed_matches, world, "allgather", torch.float64, False)


@pytest.mark.parametrize("merge,dtype", [("allreduce", torch.float32),
                                         ("allgather", torch.bfloat16)])
def test_graphed_steps_with_softcap_sinks_low_precision_at_world_3(merge, dtype) -> None:
    spawn(_graphed_matches, 3, merge, dtype, True)


def _arg(x: object) -> object:
    """A tensor by its shape, a number or flag by its value, anything else (a process
    group's handle, new at each call) by its type."""
    if isinstance(x, torch.Tensor):
        return tuple(x.shape)
    if x is None or isinstance(x, (bool, int, float, str, torch.dtype, torch.device)):
        return repr(x)
    return type(x).__name__


class _Trace(TorchDispatchMode):
    """Every op the step dispatches, with its tensor arguments' shapes and its other
    arguments' values (a slot or length baked in as a Python number would differ)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = torch.utils._pytree.tree_leaves((args, kwargs or {}))
        self.ops.append((str(func), tuple(_arg(x) for x in flat)))
        return func(*args, **(kwargs or {}))


HOST_READS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "lift_fresh",
              "item")


def _static_step(rank: int, world: int) -> None:
    cache = ShardedKVCache(_cfg(dtype=torch.float32))
    dec = GraphedDecode(cache, chunk=16)
    k, v = (torch.randn(1, 7, HKV, D, generator=torch.Generator().manual_seed(1))
            for _ in range(2))
    _prefill(cache, 0, 0, k, v)
    buffers = [t.data_ptr() for t in (*dec.member, dec.planned, dec.flags,
                                      *(s.k for s in cache.stores))]
    traces = []
    g = torch.Generator().manual_seed(2)
    for _ in range(6):  # lengths 7.., owners alternate, a page boundary is crossed
        dec.plan()
        for lay in range(LAYERS):
            q, k, v = (torch.randn(2, 1, h, D, generator=g) for h in (HQ, HKV, HKV))
            with _Trace() as t:
                dec.attend(lay, q, k, v)
            traces.append((lay, t.ops))
    for lay, ops in traces:
        first = next(o for la, o in traces if la == lay)
        assert ops == first, f"rank {rank}: layer {lay}'s step changed its ops or shapes"
        bad = [name for name, _ in ops if any(h in name for h in HOST_READS)]
        assert not bad, f"rank {rank}: host reads in the device step: {bad}"
    assert buffers == [t.data_ptr() for t in (*dec.member, dec.planned, dec.flags,
                                              *(s.k for s in cache.stores))]


def test_device_step_is_one_fixed_op_list_without_host_reads_at_world_2() -> None:
    spawn(_static_step, 2)


def _compiled_step(rank: int, world: int) -> None:
    """torch.compile(fullgraph=True) of the step: one graph per layer, no recompilation as
    lengths and owners change, the same results as the eager decode of a twin cache."""
    caches = [ShardedKVCache(_cfg()) for _ in range(2)]
    dec = GraphedDecode(caches[1], chunk=16)
    g = torch.Generator().manual_seed(3)
    k, v = (torch.randn(1, 5, HKV, D, generator=g, dtype=torch.float64) for _ in range(2))
    for c in caches:
        for lay in range(LAYERS):
            _prefill(c, lay, 1, k, v)
    graphs = []
    step = torch.compile(dec.attend, fullgraph=True,
                         backend=lambda gm, ex: graphs.append(gm) or gm)
    for _ in range(6):
        dec.plan()
        for lay in range(LAYERS):
            q, k, v = (torch.randn(2, 1, h, D, generator=g, dtype=torch.float64)
                       for h in (HQ, HKV, HKV))
            got, want = step(lay, q, k, v), caches[0].decode(lay, q, k, v)
            err = (got - want).abs().max().item()
            assert err <= 1e-12, f"rank {rank} layer {lay}: compiled vs eager {err:.2e}"
    dec.check()
    assert len(graphs) == LAYERS, f"rank {rank}: {len(graphs)} graphs for {LAYERS} layers"


@pytest.mark.parametrize("world", [2, 3])
def test_device_step_compiles_fullgraph_once_per_layer(world: int) -> None:
    spawn(_compiled_step, world)


def test_refuses_what_a_graph_cannot_hold() -> None:
    from ringmem.eviction import H2O
    cases = [(ShardedKVCache(_cfg(), eviction=EvictionPolicy(scorer=H2O(), budget=40)),
              "eviction"),
             (ShardedKVCache(_cfg(windows=(8, -1))), "sliding windows"),
             (ShardedKVCache(_cfg(capacity=2, page_size=1)), "capacity 2 must exceed"),
             (ShardedKVCache(_cfg(check_finite=False)), "needs config.check_finite=True")]
    for cache, what in cases:
        with pytest.raises(ValueError, match=what):
            GraphedDecode(cache)
    cache = ShardedKVCache(_cfg())
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        GraphedDecode(cache, chunk=0)
    with pytest.raises(ValueError, match="sinks must be a floating tensor"):
        GraphedDecode(cache, sinks=torch.zeros(3))
    dec = GraphedDecode(cache)
    q, k = torch.zeros(2, 1, HQ, D, dtype=torch.float64), torch.zeros(2, 1, HKV, D,
                                                                      dtype=torch.float64)
    with pytest.raises(ValueError, match="layer 0 was not planned"):
        dec.attend(0, q, k, k)
    dec.plan()
    dec.attend(0, q, k, k)
    with pytest.raises(ValueError, match=r"layers \[1\] were planned and not attended"):
        dec.plan()
    with pytest.raises(ValueError, match="q must be"):
        dec.attend(1, q[:, :, :2], k, k)
    with pytest.raises(ValueError, match="must hold all 2 sequences"):
        dec.attend(1, q[:1], k[:1], k[:1])


def _flags_raise_everywhere(rank: int, world: int) -> None:
    cache = ShardedKVCache(_cfg(dtype=torch.float32, capacity=8, page_size=2))
    dec = GraphedDecode(cache)
    g = torch.Generator().manual_seed(5)
    qkv = lambda: [torch.randn(2, 1, h, D, generator=g) for h in (HQ, HKV, HKV)]  # noqa
    dec.plan()
    for lay in range(LAYERS):
        q, k, v = qkv()
        if lay == 1:
            k = k + rank  # rank 1 decodes another token
        dec.attend(lay, q, k, v)
    with pytest.raises(ValueError, match="different q/k/v to layer 1"):
        dec.plan()
    # a non-finite k: not stored, the next plan raises (on every rank)
    cache = ShardedKVCache(_cfg(dtype=torch.float32, capacity=8, page_size=2))
    dec = GraphedDecode(cache)
    dec.plan()
    for lay in range(LAYERS):
        q, k, v = qkv()
        k[1, 0, 0, 0] = float("nan") if lay == 0 else k[1, 0, 0, 0]
        dec.attend(lay, q, k, v)
    mine = sum(cache.index.counts(1, s)[rank] for s in range(2))  # this rank's tokens
    assert not dec.member[0].any() and int(dec.member[1].sum()) == mine
    with pytest.raises(ValueError, match="layer 0 held NaN or inf"):
        dec.check()
    with pytest.raises(ValueError, match="layer 0 held NaN or inf"):
        dec.plan()
    # a full cache: 2 sequences fill 8 slots per rank in 8 * world / 2 steps, then every
    # rank raises before anything moves
    cache = ShardedKVCache(_cfg(dtype=torch.float32, capacity=8, page_size=2))
    dec = GraphedDecode(cache)
    for _ in range(4 * world):
        dec.plan()
        for lay in range(LAYERS):
            dec.attend(lay, *qkv())
    with pytest.raises(ValueError, match="capacity exceeded"):
        dec.plan()
    assert cache.rank_counts(0) == [4] * world and cache.rank_counts(1) == [4] * world


@pytest.mark.parametrize("world", [2, 3])
def test_flags_and_a_full_cache_raise_on_every_rank(world: int) -> None:
    spawn(_flags_raise_everywhere, world)


def test_gpu_check_script_runs_on_cpu(tmp_path) -> None:
    """benchmarks/graphed_decode.py (run by gpu_check.sh) at a tiny size, without capture:
    a broken script must not first show on a lent GPU."""
    import subprocess
    import sys
    out = tmp_path / "g.md"
    r = subprocess.run([sys.executable, "benchmarks/graphed_decode.py", "--context", "40",
                        "--layers", "2", "--batch", "2", "--steps", "3", "--q-heads", "2",
                        "--kv-heads", "1", "--dim", "8", "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "failures: 0" in out.read_text()
