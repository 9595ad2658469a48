"""Fit `plan()`'s CPU model (the kernel rate, per-launch, per-step and per-call host costs,
the gloo link) to measured runs of `benchmarks/auto_regret.py`, and say how well it fits.

On gloo the cores that compute also copy, so the loop's time is a sum: FLOPs / rate +
launches x launch + bytes / bandwidth + messages x latency + all-to-all copies / copy rate
+ all-to-alls x their fixed cost (groups of 2 and of 4 ranks) + steps x step cost + calls
x call cost (the compute and host terms times ranks / cores
where more ranks than cores share the machine), each counted on the critical path by the one time
model (`ringmem.timeline`, through `plan()`). Each count is read off by planning the option
with a unit model (that term's cost 1, every other 0), so the fit is a linear least
squares in relative error, with every cost >= 0.

Fit only on a development run; judge on another seed (`auto_regret.py --seed`). `--host`:
the host's costs (per call, the agreement per world, per step, a message's latency, an
all-to-all's fixed cost) come
from `ringmem bench calibrate --host` instead, and only the kernel and bandwidth terms are
fitted.

Run: python benchmarks/fit_cpu_model.py benchmarks/results/auto_regret_dev3/run1.json
         [RUN2.json ...] [--out benchmarks/results/cpu_model_fit]
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

import ringmem
from ringmem.links import INTERCONNECTS, Interconnect
from ringmem.plan import KernelModel, parse_option

BIG = 1e30  # "free": a rate no term reaches
TERMS = ("1/flops", "pair_s", "1/mem_bw", "launch", "1/bandwidth", "latency", "1/copy_bw",
         "step_s", "call_s", "a2a2", "a2a4")
# an all-to-all's fixed cost in groups of 2 and of 4 ranks (`KernelModel.a2a_s`; 3: the
# mean, past 4: extended linearly), so the counts are those of the model `model_of` ships
A2A_UNITS = {"a2a2": (1.0, 0.5, 0.0), "a2a4": (0.0, 0.5, 1.0)}
# measured by `ringmem bench calibrate --host`
HOST_TERMS = ("step_s", "call_s", "latency", "a2a2", "a2a4")
# the model's two non-linear inputs, chosen by the fit's own error on the development run
BWD_RATIOS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)
DENSE_BANDS = (False, True)
CPU_TILES = (False, True)  # causal pieces as pairs, or as the CPU op's whole tiles


def _models(term: str, base: Interconnect, cores: int, shape: dict[str, Any]
            ) -> tuple[KernelModel, Interconnect]:
    """The unit model of one term: its cost 1, every other cost 0; the ranks share the
    run's `cores` (`KernelModel.on_node`); shape: bwd_ratio, dense_bands and
    cpu_tiles."""
    k = KernelModel(flops=BIG, copy_bw=BIG, cores=cores, **shape)
    link = replace(base, bandwidth=BIG, latency=0.0)
    field = term.removeprefix("1/")  # a rate at 1 costs 1 a unit, like a cost at 1
    if field in ("bandwidth", "latency"):
        link = replace(link, **{field: 1.0})
    elif field in A2A_UNITS:
        k = replace(k, a2a_s=A2A_UNITS[field])
    else:
        k = replace(k, **{field: 1.0})
    return k, link


def _plan_args(case: dict[str, Any]) -> tuple[tuple, tuple, dict[str, Any]]:
    w, seq = case["world"], case["seq"]
    rows = 1 if case["mask"] == "decode" else seq // w
    q = (1, rows, case["hq"], case["dim"])
    kv = (1, seq // w, case["hkv"], case["dim"])
    docs = case["docs"]
    kw = dict(world=w, dtype=torch.float32, device_type="cpu", layout="zigzag",
              causal=case["mask"] not in ("full", "decode"), window=tuple(case["window"]),
              cu_seqlens=list(docs) if docs else None, backward=case["phase"] == "fwd+bwd")
    return q, kv, kw


def features(case: dict[str, Any], option: str, base: Interconnect, cores: int,
             shape: dict[str, Any]) -> list[float]:
    q, kv, kw = _plan_args(case)
    u, s = parse_option(option, case["world"])
    out = []
    for term in TERMS:
        k, link = _models(term, base, cores, shape)
        est = ringmem.plan(q, kv, interconnect=link, kernel=k, ulysses=u, schedule=s,
                           **kw).schedules[option]
        out.append(est.time_s)
    return out


def nnls(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """min |x t - y| with t >= 0 (active set: drop the most negative, re-solve)."""
    keep = list(range(x.shape[1]))
    while True:
        t = torch.linalg.lstsq(x[:, keep], y[:, None]).solution[:, 0]
        if (t >= 0).all():
            full = torch.zeros(x.shape[1], dtype=x.dtype)
            full[keep] = t
            return full
        keep.pop(int(torch.argmin(t)))


def host_fields(host: dict[str, Any] | None) -> dict[str, Any]:
    """The model's fields for measured host costs (`calibrate --host`'s JSON, or a fit made
    with it): the agreement and all-to-all tables and the shared latency; without them
    (None, or no "agree_s"), those of the fully fitted model."""
    if not host or not host.get("agree_s"):  # a fit's own all-to-all table, if any
        return {"agree_s": (), "a2a_s": tuple((host or {}).get("a2a_s") or ()),
                "shared_latency": False}
    return {"agree_s": tuple(host["agree_s"]), "a2a_s": tuple(host.get("a2a_s") or ()),
            "shared_latency": True}


def host_part(case: dict[str, Any], option: str, base: Interconnect, cores: int,
              host: dict[str, Any]) -> float:
    """The measured host terms' share of an option's time (`--host`): per call, the
    agreement, per step, and the messages' latency (slowed by ranks / cores)."""
    q, kv, kw = _plan_args(case)
    u, s = parse_option(option, case["world"])
    k = KernelModel(flops=BIG, copy_bw=BIG, cores=cores, step_s=host["step_s"],
                    call_s=host["call_s"], **host_fields(host))
    link = replace(base, bandwidth=BIG, latency=host["latency_s"])
    return ringmem.plan(q, kv, interconnect=link, kernel=k, ulysses=u, schedule=s,
                        **kw).schedules[option].time_s


def fit(rows: list[dict[str, Any]], base: Interconnect, cores: int, shape: dict[str, Any],
        host: dict[str, Any] | None = None) -> tuple[dict[str, float], list[dict[str, Any]]]:
    samples = []
    for c in rows:
        for option, t in c["median_s"].items():
            if option != "auto":
                samples.append((c["case"], option, t))
    x = torch.tensor([features(c, o, base, cores, shape) for c, o, _ in samples],
                     dtype=torch.float64)
    y = torch.tensor([t for _, _, t in samples], dtype=torch.float64)
    fixed = torch.zeros_like(y)
    free = list(range(len(TERMS)))
    if host is not None:  # measured, not fitted: the rest fits what they leave
        fixed = torch.tensor([host_part(c, o, base, cores, host) for c, o, _ in samples],
                             dtype=torch.float64)
        free = [i for i, t in enumerate(TERMS) if t not in HOST_TERMS]
    theta = torch.zeros(len(TERMS), dtype=torch.float64)
    # relative error: rows scaled by 1/y
    theta[free] = nnls(x[:, free] / y[:, None], 1 - fixed / y)
    pred = x[:, free] @ theta[free] + fixed
    out = [{"config": c["id"], "option": o, "measured_s": t, "predicted_s": p.item(),
            "error_pct": 100 * (p.item() / t - 1)} for (c, o, t), p in zip(samples, pred)]
    found = dict(zip(TERMS, theta.tolist()))
    if host is not None:
        found.update(step_s=host["step_s"], call_s=host["call_s"],
                     latency=host["latency_s"])
    return found, out


def model_of(theta: dict[str, float], base: Interconnect, shape: dict[str, Any],
             host: dict[str, Any] | None = None) -> tuple[KernelModel, Interconnect]:
    inv = lambda v: 1 / v if v > 0 else math.inf  # noqa: E731
    a2, a4 = theta.get("a2a2", 0.0), theta.get("a2a4", 0.0)
    fitted = {"a2a_s": (a2, (a2 + a4) / 2, a4) if a2 or a4 else ()}
    # every field from the fit or `shape` (none inherited from the shipped defaults)
    k = KernelModel(flops=inv(theta["1/flops"]), launch=theta["launch"], half=0.0,
                    copy_bw=inv(theta["1/copy_bw"]), step_s=theta["step_s"],
                    call_s=theta["call_s"], pair_s=theta["pair_s"],
                    mem_bw=inv(theta["1/mem_bw"]), **shape, **host_fields(host or fitted))
    return k, replace(base, bandwidth=inv(theta["1/bandwidth"]), latency=theta["latency"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+",
                    help="auto_regret.py's .json (development runs of one seed: their rows "
                         "are fitted together)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"
                                         / "cpu_model_fit"))
    ap.add_argument("--host", default=None,
                    help="`ringmem bench calibrate --host`'s JSON: the per-call, agreement, "
                         "per-step and latency costs are taken from it, not fitted")
    a = ap.parse_args()
    runs = [json.loads(Path(r).read_text()) for r in a.runs]
    for r, path in zip(runs, a.runs):  # one machine, one seed: the rows are comparable
        for key in ("seed", "machine"):
            if r["meta"][key] != runs[0]["meta"][key]:
                raise SystemExit(f"{path}: {key} {r['meta'][key]!r} differs from "
                                 f"{a.runs[0]}'s {runs[0]['meta'][key]!r}")
    data = {"meta": runs[0]["meta"], "cases": [c for r in runs for c in r["cases"]]}
    host = None if a.host is None else json.loads(Path(a.host).read_text())
    base = INTERCONNECTS["loopback"]
    cores = data["meta"]["machine"]["cpu_count"]
    tried = []
    for ratio, dense, tiles in itertools.product(BWD_RATIOS, DENSE_BANDS, CPU_TILES):
        shape = {"bwd_ratio": ratio, "dense_bands": dense, "cpu_tiles": tiles}
        theta, rows = fit(data["cases"], base, cores, shape, host)
        errs = [abs(r["error_pct"]) for r in rows]
        tried.append((statistics.median(errs), shape, theta, rows))
        print(f"bwd_ratio {ratio}, dense_bands {dense}, cpu_tiles {tiles}: median |error| "
              f"{statistics.median(errs):.1f}%, {sum(e <= 10 for e in errs)} of "
              f"{len(errs)} within 10%")
    _, shape, theta, rows = min(tried, key=lambda t: t[0])
    k, link = model_of(theta, base, shape, host)
    errs = [abs(r["error_pct"]) for r in rows]
    res = {"fitted_on": {"files": a.runs, "seeds": sorted({r["meta"]["seed"] for r in runs}),
                         "commits": sorted({r["meta"]["commit"] for r in runs})},
           "host_measured": a.host, "agree_s": None if host is None else host["agree_s"],
           "a2a_s": list(k.a2a_s) if host is None else host.get("a2a_s"),
           "cores": cores, "shape": shape, "theta": theta,
           "kernel": {f: getattr(k, f) for f in ("flops", "pair_s", "mem_bw", "launch",
                                                 "copy_bw", "step_s", "call_s", "bwd_ratio",
                                                 "dense_bands", "cpu_tiles")},
           "shapes_tried": [{"shape": sh, "median_abs_error_pct": m}
                            for m, sh, _, _ in tried],
           "link": {"bandwidth": link.bandwidth, "latency": link.latency},
           "fit": {"rows": len(rows), "median_abs_error_pct": statistics.median(errs),
                   "within_10pct": sum(e <= 10 for e in errs)}, "rows": rows}
    Path(a.out).with_suffix(".json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
