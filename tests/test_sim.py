"""ringmem.sim against hand-computed cases, and its bytes against plan()."""
from __future__ import annotations

import itertools
import random
from types import SimpleNamespace

import pytest

from ringmem.links import Cluster, Interconnect
from ringmem.plan import KernelModel, Message, plan
from ringmem.sim import Profile, load_library, simulate, simulate_phase, split_piece
from ringmem.timeline import Impl

GB = 1e9


def link(topology: str = "mesh", bw: float = 1 * GB, lat: float = 0.0,
         overlap: bool = True) -> Interconnect:
    return Interconnect(name="t", topology=topology, bandwidth=bw, latency=lat,
                        overlap=overlap)


def prof(**kw) -> Profile:
    base = dict(name="t", fwd_flops=1e12, bwd_flops=1e12, mem_bw=1e30)
    return Profile(**{**base, **kw})


def est(work, msgs, heads=(1, 1), d=1, batch=1, ring="kv", phase="fwd"):
    """A hand-made plan() Estimate: work[rank][step] pieces, messages of one phase."""
    return SimpleNamespace(work=work, messages={phase: msgs}, heads=heads, head_dim=d,
                           batch=batch, ring=ring, halves=[], ulysses=1)


def secs(pairs: float, rate: float = 1e12) -> float:
    return 4 * pairs / rate  # d = 1, one head


# ---- kernel model ----------------------------------------------------------------------

def test_block_time_roofline_launch_and_causal():
    p = prof(launch_s=1e-5, causal_efficiency=0.5)
    # 4 FLOPs per pair and channel: 1e6 pairs x 64 x 2 heads = 5.12e8 FLOPs
    assert p.block_s(1000, 1000, 1e6, 2, 1, 64, "fwd") == pytest.approx(1e-5 + 5.12e-4)
    # masked through: half the pairs at half the rate costs as much as the full block
    assert p.block_s(1000, 1000, 5e5, 2, 1, 64, "fwd") == pytest.approx(1e-5 + 5.12e-4)
    # backward: 2.5x the FLOPs
    assert p.block_s(1000, 1000, 1e6, 2, 1, 64, "bwd") == pytest.approx(1e-5 + 1.28e-3)
    assert p.block_s(0, 1000, 0, 2, 1, 64, "fwd") == 0.0


def test_waves_and_split_penalty():
    p = prof(units=4, tile_rows=128)
    # 256 rows x 3 heads = 6 tiles on 4 units: 2 waves, 6/8 of the units busy
    assert p.block_s(256, 100, 256 * 100, 3, 1, 1, "fwd") == pytest.approx(
        4 * 256 * 100 * 3 / (1e12 * 6 / 8))
    # two half launches pay the launch overhead twice
    q = prof(launch_s=1e-3)
    whole = q.block_s(100, 100, 1e4, 1, 1, 1, "fwd")
    halves = [q.block_s(*h, 1, 1, 1, "fwd") for h in split_piece((100, 100, 1e4))]
    assert sum(halves) == pytest.approx(whole + 1e-3)


def test_split_piece_causal_diagonal():
    n = 1000
    first, second = split_piece((n, n, n * (n + 1) / 2))
    # rows [0, 500) of a causal block see 1..500 keys: 125250 pairs (n^2/8 + n/4)
    assert first[2] == pytest.approx(125000, rel=0.01)
    assert first[2] + second[2] == n * (n + 1) / 2


def test_profile_errors_name_the_argument():
    with pytest.raises(ValueError, match="fwd_flops"):
        prof(fwd_flops=0)
    with pytest.raises(ValueError, match="causal_efficiency"):
        prof(causal_efficiency=0)
    with pytest.raises(ValueError, match="phase"):
        prof().block_s(1, 1, 1, 1, 1, 1, "sideways")


def test_calibration_reproduces_the_single_device_time():
    p = prof(launch_s=1e-5, causal_efficiency=0.9, units=132, bwd_launch_bytes=14,
             mem_bw=3e12).calibrated(8192, 32, 128, 1 / 591.5, 1 / 154.7)
    pairs = 8192 * 8193 / 2
    f = p.block_s(8192, 8192, pairs, 32, 1, 128, "fwd")
    b = p.block_s(8192, 8192, pairs, 32, 1, 128, "bwd")
    assert f == pytest.approx(1 / 591.5) and f + b == pytest.approx(1 / 154.7)


# ---- link model ------------------------------------------------------------------------

def test_duplex_and_half_duplex_contention():
    full = Cluster(2, link("mesh"))
    half = Cluster(2, link("mesh"), duplex=False)
    both = [(0, 1, 10**9), (1, 0, 10**9)]
    assert full.time(both) == pytest.approx(1.0)   # each direction its own link
    assert half.time(both) == pytest.approx(2.0)   # one shared channel


def test_switch_port_and_ring_hops_contention():
    sw = Cluster(4, link("switch"))
    # two sends out of rank 0 share its egress; a third pair is independent
    d = sw.durations([(0, 1, 10**9), (0, 2, 10**9), (3, 2, 0)])
    assert d[:2] == pytest.approx([2.0, 2.0])
    ring = Cluster(4, link("ring", lat=1e-3))
    # 0 -> 2 loads links 0-1 and 1-2; 1 -> 2 shares 1-2: both wait for 2 GB on it
    d = ring.durations([(0, 2, 10**9), (1, 2, 10**9), (3, 0, 10**9)])
    assert d == pytest.approx([2.001, 2.001, 1.001])


def test_inter_node_links():
    net = Cluster(4, link("mesh", bw=100 * GB), link("switch", bw=1 * GB), per_node=2)
    assert net.time([(0, 1, 10**9)]) == pytest.approx(0.01)
    assert net.time([(1, 2, 10**9)]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="inter"):
        Cluster(4, link(), per_node=2)


def test_group_time_is_the_last_arrival():
    rnd = random.Random(0)
    for topo in ("mesh", "switch", "ring", "bus"):
        ic = link(topo, bw=3 * GB, lat=2e-6)
        for _ in range(20):
            msgs = [(rnd.randrange(8), rnd.randrange(8), rnd.randrange(1, 10**8))
                    for _ in range(rnd.randrange(1, 12))]
            c = Cluster(8, ic)
            assert max(c.durations(msgs)) == pytest.approx(c.time(msgs))


# ---- event simulation: hand-computed cases ---------------------------------------------

def test_one_step_is_the_block():
    e = est([[((100, 100, 5050),)]], [])
    r = simulate_phase(e, "fwd", prof(), Cluster(1, link()))
    assert r.time_s == pytest.approx(secs(5050))


def two_steps(nbytes: int, pairs=(1e9, 1e9), overlap=True):
    work = [[((1, 1, pairs[0]),), ((1, 1, pairs[1]),)] for _ in range(2)]
    msgs = [Message(0, "move", 0, 1, nbytes), Message(0, "move", 1, 0, nbytes)]
    return simulate_phase(est(work, msgs), "fwd", prof(),
                          Cluster(2, link(lat=1e-3, overlap=overlap)))


def test_two_steps_compute_bound():
    # 4 ms per block; the 1 MB move (1 ms + 1 ms latency) hides under step 0
    assert two_steps(10**6).time_s == pytest.approx(0.008)


def test_two_steps_bandwidth_bound():
    # 1 GB at 1 GB/s + 1 ms latency, then step 1's 4 ms
    assert two_steps(10**9).time_s == pytest.approx(1.001 + 0.004)


def test_two_steps_without_overlap_serialise():
    assert two_steps(10**6, overlap=False).time_s == pytest.approx(0.004 + 0.002 + 0.004)


def test_fetches_without_overlap_are_copied_before_any_compute():
    # all-gather on gloo: the cores that compute also copy, so both 1 MB fetches (1 ms +
    # 1 ms latency, on their own mesh links) come before the two 4 ms blocks; with overlap
    # step 1's fetch hides under step 0
    work = [[((1, 1, 1e9),), ((1, 1, 1e9),)] for _ in range(2)]
    msgs = [Message(1, "fetch", 1, 0, 10**6), Message(1, "fetch", 0, 1, 10**6)]
    for overlap, want in ((False, 0.002 + 0.008), (True, 0.008)):
        r = simulate_phase(est(work, msgs, ring="allgather"), "fwd", prof(),
                           Cluster(2, link(lat=1e-3, overlap=overlap)))
        assert r.time_s == pytest.approx(want)


def test_host_costs_per_step_and_per_call():
    # 2 ms of host work per step on every rank and 5 ms per call: the 4 ms blocks become
    # 6 ms, the 1 MB move (2 ms) still hides under step 0, the call adds once
    work = [[((1, 1, 1e9),), ((1, 1, 1e9),)] for _ in range(2)]
    msgs = [Message(0, "move", 0, 1, 10**6), Message(0, "move", 1, 0, 10**6)]
    r = simulate_phase(est(work, msgs), "fwd", prof(step_s=0.002, call_s=0.005),
                       Cluster(2, link(lat=1e-3)))
    assert r.time_s == pytest.approx(0.005 + 2 * 0.006)
    # host time is neither link time nor all-to-all: the links carried one 2 ms group
    assert r.a2a_s == 0.0 and r.links_s == pytest.approx(0.002)
    with pytest.raises(ValueError, match="step_s"):
        prof(step_s=-1.0)


def test_cpu_kernel_model_terms_and_shared_cores():
    # one block of 1000 x 1000 scores, 2 heads (1 K/V head), d 4, fp32: each term alone
    k = KernelModel(1e9, launch=1e-3, pair_s=1e-9, mem_bw=1e9, bwd_ratio=1.5)
    pairs, fl = 1e6, 4 * 1e6 * 2 * 4
    read = (2 * 1000 * 2 + 2 * 1000 * 1) * 4 * 4
    fwd = 1e-3 + fl / 1e9 + 2e6 * 1e-9 + read / 1e9
    assert k.block_s(1000, 1000, pairs, 2, 1, 4, "fwd", 1, 4) == pytest.approx(fwd)
    assert k.block_s(1000, 1000, pairs, 2, 1, 4, "bwd", 1, 4) == pytest.approx(
        1e-3 + 1.5 * (fwd - 1e-3))
    # 4 ranks on 2 cores compute at half a core's rate; 2 ranks on 2 cores as alone; the
    # shared model does not share again
    two = KernelModel(1e9, launch=1e-3, step_s=1e-4, pair_s=1e-9, mem_bw=1e9, copy_bw=2e9,
                      cores=2)
    assert two.on_node(2) is two
    half = two.on_node(4)
    assert (half.flops, half.launch, half.step_s, half.pair_s, half.mem_bw, half.copy_bw
            ) == (5e8, 2e-3, 2e-4, 2e-9, 5e8, 1e9) and half.on_node(4) is half
    # plan() shares the CPU's cores: at more ranks than cores, the compute is slower
    q = (1, 512, 2, 16)
    free = plan(q, q, world=4, device_type="cpu", kernel=KernelModel(1e9, cores=0),
                schedule="kv")
    shared = plan(q, q, world=4, device_type="cpu", kernel=KernelModel(1e9, cores=1),
                  schedule="kv")
    assert shared.schedules["kv"].compute_s == pytest.approx(
        4 * free.schedules["kv"].compute_s)


def test_dense_bands_cost_every_score_of_a_windowed_block():
    # the CPU op takes a window as an explicit bias: every rows x keys score is computed;
    # the plain causal triangle and full blocks cost their pairs either way
    q = (1, 256, 1, 8)
    for window, dense_more in (((32, 0), True), ((-1, -1), False)):
        t = [plan(q, q, world=2, device_type="cpu", window=window, schedule="kv",
                  causal=True, kernel=KernelModel(1e9, dense_bands=d)).schedules["kv"]
             for d in (False, True)]
        assert (t[1].compute_s > 1.5 * t[0].compute_s) == dense_more, (window, t)
        assert t[0].pairs == t[1].pairs  # the pairs reported are the pairs, not the cost



def _kernel_loop_scores(rows: int, keys: int) -> int:
    """The CPU flash op's causal loop, step by step (ATen FlashAttentionKernel.cpp): query
    tiles of q_split rows; each scores kv_split-key chunks while the chunk starts before
    the tile's end."""
    q_split = 256 if rows >= 768 else 64 if rows >= 192 else 32
    kv_split = min(512, keys)
    total = 0
    for m in range(0, rows, q_split):
        q_block = min(q_split, rows - m)
        for n in range(0, min(m + q_block, keys), kv_split):
            total += q_block * min(kv_split, keys - n)
    return total


def test_cpu_causal_scores_follow_the_ops_tiles():
    from ringmem.kernel_model import cpu_causal_scores
    for rows, keys in itertools.product((1, 31, 32, 100, 191, 192, 511, 512, 513, 767,
                                         768, 1024, 1500, 3072), repeat=2):
        assert cpu_causal_scores(rows, keys) == _kernel_loop_scores(rows, keys), (rows, keys)
    # causal / full time measured on one thread (fp32, d=64, forward and backward alike)
    for n, measured in ((512, 1.0), (768, 0.78), (1024, 0.75), (2048, 0.63), (3072, 0.59)):
        assert cpu_causal_scores(n, n) / n ** 2 == pytest.approx(measured, abs=0.01)
    assert cpu_causal_scores(0, 5) == cpu_causal_scores(5, 0) == 0


@pytest.mark.parametrize("rows,keys,nan_key", [(100, 300, 299), (512, 512, 511),
                                               (1024, 1024, 600), (2048, 2048, 1100)])
def test_the_cpu_op_scores_the_tiles_cpu_causal_scores_counts(rows, keys, nan_key):
    # the op itself: a NaN value at one key reaches every row whose tile scored that key's
    # chunk, visible or not (0 x NaN), and no other row; cpu_causal_scores' tiles
    # (computed keys up to min(keys, ceil(tile end / 512) * 512)) say which rows those are
    import torch
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 1, rows, 8), torch.randn(1, 1, keys, 8), torch.randn(1, 1, keys, 8)
    v[0, 0, nan_key] = float("nan")
    out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)[0]
    got = out[0, 0].isnan().any(-1)
    q_split = 256 if rows >= 768 else 64 if rows >= 192 else 32
    kv_split = min(512, keys)
    ends = torch.clamp((torch.arange(rows) // q_split + 1) * q_split, max=rows)
    scored = torch.clamp((ends + kv_split - 1) // kv_split * kv_split, max=keys)
    assert torch.equal(got, scored > nan_key), (rows, keys, got.int().argmax())
    # and the scored keys per row are what cpu_causal_scores sums
    from ringmem.kernel_model import cpu_causal_scores
    assert int(scored.sum()) == cpu_causal_scores(rows, keys)


def test_cpu_tiles_cost_a_small_causal_square_as_a_full_one():
    # at <= 512 rows the CPU op scores every key of a causal square: with cpu_tiles the
    # one-rank causal block costs what the full one does; without, about half
    q = (1, 512, 1, 8)
    t = {(c, tiles): plan(q, q, world=1, device_type="cpu", causal=c, schedule="kv",
                          kernel=KernelModel(1e9, cpu_tiles=tiles)).schedules["kv"]
         for c in (False, True) for tiles in (False, True)}
    assert t[True, True].compute_s == pytest.approx(t[False, True].compute_s)
    assert t[True, False].compute_s == pytest.approx(t[False, False].compute_s * 513 / 1024)
    assert t[True, True].pairs == t[True, False].pairs  # pairs reported stay the pairs


def test_pure_compute_and_pure_bandwidth_limits():
    # no bytes: the sum of the blocks; no compute: the transfer alone
    assert two_steps(0, (3e9, 2e9)).time_s == pytest.approx(0.012 + 0.008)
    assert two_steps(10**9, (0, 0)).time_s == pytest.approx(1.001)


def test_contention_two_senders_one_receiver():
    # ranks 1 and 2 both send 1 GB to rank 0 through a switch: rank 0's ingress is shared
    work = [[((1, 1, 1.0),), ((1, 1, 1.0),)] for _ in range(3)]
    msgs = [Message(0, "move", 1, 0, 10**9), Message(0, "move", 2, 0, 10**9)]
    r = simulate_phase(est(work, msgs), "fwd", prof(), Cluster(3, link("switch")))
    assert r.time_s == pytest.approx(2.0 + secs(1), rel=1e-6)


def test_returns_overlap_the_second_half_of_the_own_block():
    # TokenRing at 2 ranks: own block split in halves; the step-1 result (1 GB at
    # 1 GB/s) returns while the second half (4 s) is computed: the return is hidden
    blk = 1e12  # 4 s per full unmasked block (1 x 1e12 pairs)
    work = [[((2, 1, blk),), ((2, 1, blk),)] for _ in range(2)]
    msgs = [Message(0, "move", 0, 1, 1), Message(0, "move", 1, 0, 1),
            Message(1, "ret", 0, 1, 10**9), Message(1, "ret", 1, 0, 10**9)]
    r = simulate_phase(est(work, msgs, ring="q"), "fwd", prof(), Cluster(2, link()))
    assert r.time_s == pytest.approx(2 + 4 + 2, rel=1e-6)  # half, step 1, half
    # a return longer than the second half shows: 2 + 4 + 10
    msgs[2:] = [Message(1, "ret", 0, 1, 10 * 10**9), Message(1, "ret", 1, 0, 10 * 10**9)]
    r = simulate_phase(est(work, msgs, ring="q"), "fwd", prof(), Cluster(2, link()))
    assert r.time_s == pytest.approx(2 + 4 + 10, rel=1e-6)


def test_merge_epilogue_uses_the_implementation_bytes():
    work = [[((1, 1, 0.0),), ((1000, 1, 0.0),)]]
    e = est(work, [], heads=(2, 1), d=10)
    p = prof(mem_bw=1e6)
    # step 1 folds 1000 rows x 2 heads x 10 channels = 2e4 elements
    r = simulate_phase(e, "fwd", p, Cluster(1, link()), impl=Impl("x", 50.0, 0.0))
    assert r.time_s == pytest.approx(2e4 * 50 / 1e6)
    ours = Impl.ringmem(2, 4)
    assert (ours.fwd_merge, ours.bwd_sum) == (26, 18)


# ---- one source of truth: the bytes are plan()'s --------------------------------------

@pytest.mark.parametrize("layout", ["zigzag", "contiguous", "stripe"])
def test_simulated_bytes_equal_plan_for_every_schedule(layout):
    q, kv, world = (1, 256, 8, 16), (1, 256, 2, 16), 4
    p = load_library().profiles["A100-FA2"]
    options = plan(q, kv, world=world, layout=layout, ulysses="auto",
                   backward=True).schedules
    assert {"kv", "q", "allgather", "ulysses", "ulysses2+kv", "ulysses2+q"} <= set(options)
    for name, ref in options.items():
        r = simulate(q, kv, world=world, profile=p, intra=link("switch", bw=100 * GB),
                     option=name, layout=layout, backward=True)
        for ph in ("fwd", "bwd"):
            assert r.phases[ph].bytes == ref.bytes(ph) > 0, (name, ph)
        assert r.time_s > 0


def test_simulate_rejects_bad_arguments():
    p = load_library().profiles["A100-FA2"]
    with pytest.raises(ValueError, match="dtype"):
        simulate((1, 64, 2, 8), (1, 64, 2, 8), world=2, profile=p, intra=link(),
                 dtype="int8")
    with pytest.raises(ValueError, match="option"):
        simulate((1, 64, 2, 8), (1, 64, 2, 8), world=2, profile=p, intra=link(),
                 option="sideways")
    e = est([[((1, 1, 1.0),)]], [])
    with pytest.raises(ValueError, match="bwd"):
        simulate_phase(e, "bwd", p, Cluster(1, link()))


def test_decode_block_is_bound_by_its_reads():
    p = prof(mem_bw=1e12, fwd_flops=1e15)
    # FLOPs: 4 x 1e6 x 128 x 32 = 1.6e10 -> 16 us; reads: one query row against 1e6 keys
    # of 8 K/V heads, d=128, bf16: 4.096 GB of K and V -> 4.1 ms
    t = p.block_s(1, 10**6, 10**6, 32, 1, 128, "fwd", kv_heads=8, itemsize=2)
    assert t == pytest.approx((32 + 2 * 10**6 * 8) * 128 * 2 / 1e12)
    assert prof(mem_bw=1e15).block_s(1, 10**6, 10**6, 32, 1, 128, "fwd", 8) == \
        pytest.approx(4 * 10**6 * 128 * 32 / 1e12)  # fast memory: compute-bound again


def test_measured_table_rate_interpolates_over_rows():
    # 1e9 FLOP/s measured at 100 rows, 2e9 at 10000: 1.5e9 at 1000 (halfway in log rows)
    table = (("fwd", 100, 100, 1e4, 1.0, 1e9), ("fwd", 10000, 100, 1e6, 1.0, 2e9))
    p = prof(table=table)
    assert p.table_rate("fwd", 1000) == pytest.approx(1.5e9)
    assert p.table_rate("fwd", 1) == pytest.approx(1e9)       # clamped below
    assert p.table_rate("bwd", 1000) is None                   # no bwd entries: roofline
    assert p.block_s(1000, 10, 1e4, 1, 1, 1, "fwd") == pytest.approx(4e4 / 1.5e9)


def test_fit_recovers_a_known_roofline():
    from ringmem.sim.calibrate import fit
    rate, launch = 5e10, 1e-3
    table = [(ph, r, k, p, launch + f / rate / (0.8 if p < r * k else 1), f)
             for ph in ("fwd", "bwd") for r, k, p in
             ((512, 512, 512 * 512), (2048, 2048, 2048 * 2048), (2048, 2048, 2048 * 1024))
             for f in (4.0 * p * 64 * 8,)]
    p = fit(table, mem_bw=1e10, name="x")
    assert p.fwd_flops == pytest.approx(rate) and p.launch_s == pytest.approx(launch)
    assert p.causal_efficiency == pytest.approx(0.8)


# ---- ringmem bench ---------------------------------------------------------------------

def test_bench_commands():
    import sys

    from ringmem.sim.bench import script_command
    cmd = script_command("ring", ["--seq", "1024"])
    assert cmd[:3] == [sys.executable, "-m", "ringmem.torchrun"]
    assert "--nproc-per-node=2" in cmd and cmd[-3:][1:] == ["--seq", "1024"]
    assert cmd[-3].endswith("benchmarks/ring_cpu.py")
    cmd = script_command("decode", ["--nproc", "3", "--quick"])
    assert "--nproc-per-node=3" in cmd and cmd[-1] == "--quick"
    assert script_command("validate", [])[-1].endswith("sim_validation.py")
    with pytest.raises(ValueError, match="bench job"):
        script_command("sideways", [])
    with pytest.raises(ValueError, match="--nproc"):
        script_command("ring", ["--nproc", "zero"])


def test_cli_routes_bench(capsys):
    from ringmem.cli import main
    assert main(["bench", "--help"]) == 0
    assert "ringmem bench sim" in capsys.readouterr().out
    assert main(["bench", "sideways"]) == 2


def test_bench_sim_quick_writes_report_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from ringmem.sim.sweeps import run_sweeps
    assert run_sweeps(["--quick", "--out-dir", str(tmp_path)]) == 0
    names = {p.name for p in tmp_path.iterdir()}
    assert {"sim_sweeps_quick.md", "sim_sweeps_quick.json", "sim_gpus.png", "sim_seq.png",
            "sim_choice.png", "sim_decode.png"} <= names
    import json
    res = json.loads((tmp_path / "sim_sweeps_quick.json").read_text())
    # strong scaling: more GPUs, less time; efficiency a fraction of the peak
    kv = [r for r in res["gpus"] if r["option"] == "kv"]
    assert all(a["time_s"] > b["time_s"] for a, b in zip(kv, kv[1:]))
    assert all(0 < r["efficiency"] <= 1.0 for r in res["gpus"] + res["seq"])


@pytest.mark.parametrize("bw", [1e12, 1e8])  # compute-bound, then bandwidth-bound
def test_plan_and_simulator_share_one_time_model(bw):
    # plan()'s KernelModel and a Profile with the same rate and no launch, merge or mask
    # costs: the one event model (`timeline`) gives the same time through either door
    rate = 1e12
    ic = Interconnect(name="t", topology="mesh", bandwidth=bw, latency=1e-6)
    q = kv = (1, 1024, 4, 64)
    ref = plan(q, kv, world=4, interconnect=ic, kernel=KernelModel(rate),
               schedule="kv").schedules["kv"]
    p = Profile(name="plain", fwd_flops=rate, bwd_flops=rate, mem_bw=1e30)
    r = simulate(q, kv, world=4, profile=p, intra=ic, option="kv",
                 impl=Impl("none", 0.0, 0.0))
    assert r.time_s == pytest.approx(ref.time_s, rel=1e-9)


def test_allgather_fetches_posted_at_once_share_the_ingress():
    # rank 0 fetches 1 GB from rank 1 (used at step 1) and 1 GB from rank 2 (step 2), both
    # posted before step 0 through one switch port: step 1's data after 1 s, step 2's
    # after 2 s (its bytes queue behind step 1's); blocks of 4 ms each
    work = [[((1, 1, 1e9),)] * 3 for _ in range(3)]
    msgs = [Message(1, "fetch", 1, 0, 10**9), Message(2, "fetch", 2, 0, 10**9)]
    r = simulate_phase(est(work, msgs, ring="allgather"), "fwd", prof(),
                       Cluster(3, link("switch")))
    assert r.start[0] == pytest.approx([0.0, 1.0, 2.0])
    assert r.time_s == pytest.approx(2.004)


def test_gpu_check_caps_and_dry_run():
    import re
    import subprocess
    from pathlib import Path

    import torch
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    caps = {m[0]: int(m[1]) for m in re.findall(r"^\s*step (\w+) (\d+) ", script.read_text(),
                                                 re.M)}
    assert "sim_calibrate" in caps and sum(caps.values()) <= 480, caps
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the dry run does not apply")
    got = subprocess.run(["bash", str(script), "/tmp/ringmem_gpu_check_dry"],
                         capture_output=True, text=True, timeout=120)
    assert got.returncode == 0 and "needs a CUDA GPU" in got.stdout


def test_pieces_of_one_batch_row_count_once():
    # packed documents that differ per batch row: each row's pieces cover that row only,
    # so the time model's work (pairs per batch row, times the batch) is the plan's pairs
    import torch

    from ringmem.masking import make_mask
    docs = [torch.tensor([0, 300, 1024, 2048]), torch.tensor([0, 2048])]
    m = make_mask(True, (-1, -1), docs, 2, "zigzag", 2, 1024)
    assert m.per_row
    # a model that costs pieces as their pairs (the CPU default costs the op's tiles)
    e = plan((2, 1024, 8, 64), (2, 1024, 8, 64), world=2, mask=m, schedule="kv",
             device_type="cpu", kernel=KernelModel(1e9)).schedules["kv"]
    got = [[sum(p[2] for p in w) * e.batch for w in rank] for rank in e.work]
    assert got == [[pytest.approx(x) for x in rank] for rank in e.pairs]


@pytest.mark.parametrize("window", [(-1, -1), (256, 0)])
def test_own_block_splits_where_the_loop_splits_it(window):
    # with returns (q), the loop computes its own block in two halves split at the middle
    # row (`routing.split_rows`): the plan's halves are those pieces, no pair lost
    from ringmem.masking import make_mask, pairs
    from ringmem.routing import Geometry, split_rows, step_block
    e = plan((1, 2048, 4, 64), (1, 2048, 4, 64), world=2, window=window,
             schedule="q").schedules["q"]
    geo = Geometry.uniform("zigzag", 2, 2048, 2048,
                           make_mask(True, window, None, 1, "zigzag", 2, 2048), "q")
    for rank in range(2):
        first, second = e.halves[rank]
        a, z = split_rows(step_block(geo, rank, 0)[2], 1024)
        assert [p[:2] for p in first] == [(p.q.stop - p.q.start, p.k.stop - p.k.start)
                                          for p in a]
        assert [p[2] for p in second] == [pairs(p) for p in z]
        assert sum(p[2] for h in (first, second) for p in h) == sum(
            p[2] for p in e.work[rank][0])


def test_every_published_input_names_its_kind():
    # every number a profile or a link feeds the model with says what it is, so a reader
    # can tell a datasheet figure from a benchmark, a count or an assumption
    import json

    from ringmem.sim.kernel import published_path
    raw = json.loads(published_path().read_text())
    allowed = ("datasheet", "kernel benchmark", "kernel source", "assumption")
    lib = load_library()
    for group in ("profiles", "links"):
        for name, entry in raw[group].items():
            inputs = [f for f, v in entry.items() if f == "calibration"
                      or (isinstance(v, (int, float)) and not isinstance(v, bool))]
            kinds = lib.kinds[name]
            assert set(inputs) <= set(kinds), (name, set(inputs) - set(kinds))
            assert all(k.startswith(allowed) for k in kinds.values()), (name, kinds)
