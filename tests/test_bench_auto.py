"""benchmarks/auto_regret.py and fit_cpu_model.py: the config generator, the regret
arithmetic and the linear fit of the CPU model, on hand-made inputs."""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import auto_regret  # noqa: E402
import fit_cpu_model  # noqa: E402

from ringmem.links import INTERCONNECTS  # noqa: E402


def test_generator_is_seeded_capped_and_covers_the_space():
    a, b = auto_regret.generate(1, 30), auto_regret.generate(1, 30)
    assert a == b and a != auto_regret.generate(2, 30)
    assert {c.world for c in a} == {2, 3, 4}
    assert {c.mask for c in a} == {"causal", "window", "docs", "full", "decode"}
    assert {c.phase for c in a} == {"fwd", "fwd+bwd"}
    for c in a:
        assert auto_regret.fwd_flops(c) <= auto_regret.FLOP_CAP
        assert c.hq % c.hkv == 0 and c.seq % (2 * c.world) == 0
        if c.docs:
            assert c.docs[0] == 0 and c.docs[-1] == c.seq and list(c.docs) == sorted(c.docs)


def test_regret_ties_and_fixed_policies():
    case = {"id": 0, "world": 2, "seq": 8, "hq": 2, "hkv": 2, "dim": 8, "mask": "causal",
            "phase": "fwd", "window": [-1, -1], "docs": []}
    times = {"kv": [1.0, 1.0, 1.0, 1.0, 1.0], "q": [2.0] * 5,
             "allgather": [1.02, 0.9, 1.1, 1.05, 0.95], "ulysses": [4.0] * 5,
             "auto": [1.0] * 5}
    pred = {n: 1.0 for n in ("kv", "q", "allgather", "ulysses")}
    res = auto_regret.analyse([{"case": case, "choice": "allgather", "times": times,
                                "predicted_s": pred}])
    c = res["cases"][0]
    assert c["fastest"] == "kv"
    assert c["regret"]["auto"] == pytest.approx(0.02)  # median 1.02 over 1.0
    assert c["tie"]  # 0.02 is inside allgather's interquartile range (0.1)
    assert c["regret"]["q"] == pytest.approx(1.0) and c["regret"]["ulysses"] == 3.0
    assert c["regret"]["random"] == pytest.approx((0 + 1 + 0.02 + 3) / 4)
    assert res["accuracy"]["within_10pct"] == 2  # kv and allgather predicted at 1.0 s


def test_nnls_recovers_nonnegative_costs():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 4, generator=g, dtype=torch.float64)
    theta = torch.tensor([2.0, 0.0, 0.5, 3.0], dtype=torch.float64)
    got = fit_cpu_model.nnls(x, x @ theta)
    assert torch.allclose(got, theta, atol=1e-9)
    # a fit that wants a negative cost gets 0 there instead
    got = fit_cpu_model.nnls(x, x @ torch.tensor([2.0, -1.0, 0.5, 3.0], dtype=torch.float64))
    assert (got >= 0).all() and got[1] == 0


@pytest.mark.parametrize("option,world,hq", [
    ("kv", 2, 4), ("q", 2, 4), ("allgather", 2, 4), ("ulysses", 2, 4),
    # all-to-alls of 3 and of 8 ranks: the table's mean and its linear extension
    ("ulysses", 3, 12), ("ulysses", 8, 16), ("ulysses4+kv", 8, 16)])
def test_the_cpu_time_is_nearly_linear_in_the_fitted_costs(option, world, hq):
    # on gloo (links that do not overlap compute) the time model is nearly a sum of the
    # terms: a model's time is close to the dot product of its costs with the unit counts
    case = {"id": 0, "world": world, "seq": 1024 * world // 2, "hq": hq, "hkv": hq // 2,
            "dim": 32, "mask": "causal", "phase": "fwd+bwd", "window": [-1, -1],
            "docs": []}
    base = INTERCONNECTS["loopback"]
    # one core for 2 ranks: the compute terms count twice (`KernelModel.on_node`)
    shape = {"bwd_ratio": 1.5, "dense_bands": True}
    f = fit_cpu_model.features(case, option, base, 1, shape)
    theta = {"1/flops": 1 / 40e9, "pair_s": 1e-9, "1/mem_bw": 1 / 4e9, "launch": 2e-5,
             "1/bandwidth": 1 / 1.5e9, "latency": 6e-5, "1/copy_bw": 1 / 3e9,
             "step_s": 3e-4, "call_s": 1e-3, "a2a2": 2e-4, "a2a4": 5e-4}
    k, link = fit_cpu_model.model_of(theta, base, shape)
    k = replace(k, cores=1)
    q, kv, kw = fit_cpu_model._plan_args(case)
    u, s = fit_cpu_model.parse_option(option, world)
    t = fit_cpu_model.ringmem.plan(q, kv, interconnect=link, kernel=k, ulysses=u,
                                   schedule=s, **kw).schedules[option].time_s
    linear = sum(theta[n] * x for n, x in zip(fit_cpu_model.TERMS, f))
    # each count is its own critical path, and a max of sums is at most the sum of the
    # maxes: the linear form is an upper bound, tight up to the waits between the ranks
    assert linear * 0.95 <= t <= linear * (1 + 1e-9)


def test_sample_order_times_every_round_of_every_config_once():
    for per_config in (False, True):
        order = auto_regret.sample_order(4, 3, per_config)
        assert sorted(order) == [(i, r) for i in range(4) for r in range(3)]
        # a config's rounds run in order
        assert all([r for i2, r in order if i2 == i] == [0, 1, 2] for i in range(4))
    spread = auto_regret.sample_order(4, 3, False)
    assert [r for _, r in spread] == [0] * 4 + [1] * 4 + [2] * 4  # round by round
    assert [i for i, _ in spread[4:8]] == [1, 2, 3, 0]  # the configs' order rotates
    assert auto_regret.sample_order(4, 3, True)[:3] == [(0, 0), (0, 1), (0, 2)]


def _run(seed: int, medians: dict, predicted: dict) -> dict:
    cases = [{"case": {"id": i}, "median_s": {**m, "auto": min(m.values())},
              "predicted_s": predicted[i]} for i, m in medians.items()]
    summary = {p: {"median": 0.0, "p90": 0.1, "total_s": 1.0} for p in ("auto", "kv", "q",
                                                                         "random")}
    summary["kv"]["total_s"] = 1.2
    return {"meta": {"seed": seed, "date": "d", "commit": "c"}, "cases": cases,
            "summary": summary}


def test_repeat_report_counts_the_runs_own_reproducibility():
    import auto_regret_repeat as rep
    a = _run(2, {0: {"kv": 1.0, "q": 2.0}, 1: {"kv": 1.0, "q": 1.0}},
             {0: {"kv": 1.05, "q": 1.0}, 1: {"kv": 1.0, "q": 1.3}})
    b = _run(2, {0: {"kv": 1.05, "q": 2.5}, 1: {"kv": 0.8, "q": 1.0}},
             {0: {"kv": 1.05, "q": 1.0}, 1: {"kv": 1.0, "q": 1.3}})
    assert rep.accuracy(a["cases"])["within_10pct"] == 2  # 1.05 vs 1.0 and 1.0 vs 1.0
    g = rep.agreement(a, b)  # +5%, +25%, -20%, 0%
    assert (g["rows"], g["within_10pct"]) == (4, 2)
    assert g["median_abs_change"] == pytest.approx(0.125)
    md, data = rep.report([a, b], ["a", "b"])
    assert "| a | b | 2/4 |" in md and data["runs"][0]["best_fixed_total_s"] == 1.0
    with pytest.raises(SystemExit, match="share one seed"):
        rep.report([a, _run(3, {}, {})], ["a", "c"])


def test_agreement_and_shared_latency_enter_the_plan():
    """The measured agreement is added once per call at the call's world (extended
    linearly past the table), and with shared_latency a message waits ranks / cores
    times longer where more ranks than cores share the node."""
    import torch

    import ringmem
    from ringmem.plan import KernelModel
    k = KernelModel(flops=1e30, copy_bw=1e30, agree_s=(1.0, 3.0, 4.0))
    assert [k.agreement(w) for w in (1, 2, 3, 4, 5, 7)] == [0.0, 1.0, 3.0, 4.0, 5.0, 7.0]
    assert KernelModel(flops=1.0, agree_s=(2.0,)).agreement(4) == 6.0
    shape = (1, 2, 1, 8)
    kw = dict(dtype=torch.float32, device_type="cpu", causal=True, schedule="kv")
    free = replace(INTERCONNECTS["loopback"], bandwidth=1e30, latency=0.0)
    for world in (2, 3, 4):
        t = ringmem.plan(shape, shape, world=world, kernel=k, interconnect=free,
                         **kw).schedules["kv"].time_s
        assert t == pytest.approx(k.agreement(world), rel=1e-9)
    link = replace(free, latency=1.0)
    times = {}
    for shared in (False, True):
        m = KernelModel(flops=1e30, copy_bw=1e30, cores=2, shared_latency=shared)
        times[shared] = [ringmem.plan(shape, shape, world=w, kernel=m, interconnect=link,
                                      **kw).schedules["kv"].time_s for w in (2, 4)]
    assert times[True][0] == pytest.approx(times[False][0])  # 2 ranks, 2 cores: no wait
    assert times[True][1] == pytest.approx(2 * times[False][1])  # 4 ranks on 2 cores


def test_host_calibration_measures_positive_costs_on_gloo():
    """`ringmem bench calibrate --host`'s measurement at worlds 1 and 2 (a short run): the
    unit counts are the plan's, every cost is positive and finite, and the fit world's
    loop is what its costs add up to."""
    import math

    from ringmem.sim.host import counts, measure_host
    assert counts(2, 2) == pytest.approx({"steps": 2.0, "blocks": 2.0, "messages": 1.0})
    assert counts(4, 2)["steps"] == pytest.approx(8.0)  # 4 ranks on 2 cores: twice 4
    with pytest.raises(ValueError, match="worlds must hold 1"):
        measure_host(worlds=(2, 3))
    r = measure_host(worlds=(1, 2), repeats=20)
    two = r["worlds"]["2"]
    for name in ("agreed", "run", "block", "message", "all_to_all"):  # measured
        assert 0 < two[name] < math.inf, (name, two[name])
    # derived: a difference of noisy medians (its sign is checked where it is written)
    assert math.isfinite(r["step_s"]) and len(r["agree_s"]) == len(r["a2a_s"]) == 1
    assert r["call_s"] == r["worlds"]["1"]["agreed"] and r["latency_s"] == two["message"]
    assert two["predicted_run"] == pytest.approx(two["run"])


def test_measured_all_to_all_cost_enters_ulysses_options_only():
    """A Ulysses option pays the measured all-to-all cost once per exchange (in and out);
    a ring option pays none; a group of 2 measured on 2 cores costs twice as much when 4
    ranks share them (`on_node`), a group of 4 (measured so) the same."""
    import torch

    import ringmem
    from ringmem.plan import KernelModel
    k = KernelModel(flops=1e30, copy_bw=1e30, a2a_s=(1.0, 2.0, 3.0), cores=2)
    assert k.on_node(4).a2a_s == (2.0, 2.0 * 2 / 1.5, 3.0)
    free = replace(INTERCONNECTS["loopback"], bandwidth=1e30, latency=0.0)
    shape = (1, 2, 4, 8)
    p = ringmem.plan(shape, shape, world=4, kernel=k, interconnect=free, ulysses="auto",
                     dtype=torch.float32, device_type="cpu", causal=True)
    assert p.schedules["kv"].time_s == pytest.approx(0.0, abs=1e-12)
    assert p.schedules["ulysses"].time_s == pytest.approx(2 * 3.0)
    assert p.schedules["ulysses2+kv"].time_s == pytest.approx(2 * 2.0)
