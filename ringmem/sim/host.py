"""The host's own costs of a ring call, measured on this machine's ranks: per call (checks,
the cross-rank agreement), per ring step (the loop's Python, posting its transfers), and a
message's latency and bandwidth (`ringmem bench calibrate --host`; gloo on the CPU).

At each world size W (one torchrun each, one thread per rank; medians of `repeats` calls,
each after a barrier, the slowest rank's time), for a `ring_attention` forward whose compute
and bytes are negligible (schedule kv, zigzag, causal, 2 tokens x 1 head x 8 per rank):

- `agreed`: its checks and cross-rank agreement alone (`call.agreed`): the per-call cost;
- `run`: its ring loop alone (`call.run`): steps + blocks + messages;
- `block`: one such block forward of the backend alone;
- `message`: one ring exchange of 64 bytes (isend to the next rank, irecv from the
  previous, wait); `bandwidth`: the same with 4 MiB; `all_to_all`: one all-to-all of 64
  bytes to every rank (a Ulysses exchange's fixed cost).

How many steps, blocks and messages the loop's critical path holds is read off `plan()`
with unit models (as `benchmarks/fit_cpu_model.py` does), so at the smallest W > 1 (no rank
waiting for a core)
    step = (run - blocks * block - messages * message) / steps,
the call costs `agreed(1)` plus the agreement `agreed(W) - agreed(1)` at each W, an
all-to-all `all_to_all(W) - message(W)` more than the link model's one message, and the
other worlds' loops are predicted from these costs (the compute and the latency slowed by
ranks / cores, as `plan()` models ranks sharing cores) and reported beside their
measurement.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

TOKENS, HEADS, DIM = 2, 1, 8  # per rank: compute and bytes far below the host's costs
BIG = 1e30


def rank_times(fn: Callable[[], Any], repeats: int, warmup: bool = True,
               over_ranks: bool = True) -> list[float]:
    """Wall times of `repeats` calls (after a warm-up call); with over_ranks, each call
    starts after a barrier and counts the slowest rank's time (the benchmarks' `timed`)."""
    import torch
    import torch.distributed as dist
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        if over_ranks:
            dist.barrier()  # start together so the max over ranks is the ring's wall time
        t0 = time.perf_counter()
        fn()
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        if over_ranks:
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        times.append(dt.item())
    return times


def _median_s(fn: Callable[[], Any], repeats: int) -> float:
    return statistics.median(rank_times(fn, repeats))


def _worker(out: str, repeats: int) -> None:
    import torch
    import torch.distributed as dist

    from ringmem.backends import get_backend
    from ringmem.call import Call, agreed, run
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(1, TOKENS, HEADS, DIM, generator=g) for _ in range(3))
    res: dict[str, float] = {}
    with torch.no_grad():
        c = Call(q, k, v, True, "zigzag", "kv")
        res["agreed"] = _median_s(lambda: agreed(c, None, None, False), repeats)
        a = agreed(c, None, None, False)
        res["run"] = _median_s(lambda: run(c, None, a), repeats)
        be = get_backend("auto", q.device, q.dtype, DIM)
        res["block"] = _median_s(lambda: be.fwd(q, k, v, DIM ** -0.5, False), repeats)
    if world > 1:
        for name, n in (("message", 16), ("bandwidth", 1 << 20)):
            send, recv = torch.ones(n), torch.empty(n)

            def exchange(send: torch.Tensor = send, recv: torch.Tensor = recv) -> None:
                ops = [dist.P2POp(dist.isend, send, (rank + 1) % world),
                       dist.P2POp(dist.irecv, recv, (rank - 1) % world)]
                for w in dist.batch_isend_irecv(ops):
                    w.wait()
            t = _median_s(exchange, repeats)
            res[name] = t if name == "message" else n * 4 / max(t - res["message"], 1e-9)
        send, recv = torch.ones(16 * world), torch.empty(16 * world)
        res["all_to_all"] = _median_s(lambda: dist.all_to_all_single(recv, send), repeats)
    if rank == 0:
        Path(out).write_text(json.dumps(res))
    dist.destroy_process_group()


def counts(world: int, cores: int) -> dict[str, float]:
    """Steps, blocks and messages on the tiny call's critical path, from `plan()` with a
    unit model per term (the ranks share `cores`, as `KernelModel.on_node` models)."""
    import torch

    import ringmem
    from ringmem.links import INTERCONNECTS
    from ringmem.plan import KernelModel
    base = replace(INTERCONNECTS["loopback"], bandwidth=BIG, latency=0.0)
    out = {}
    for term, k, link in (
            ("steps", KernelModel(flops=BIG, copy_bw=BIG, step_s=1.0, cores=cores), base),
            ("blocks", KernelModel(flops=BIG, copy_bw=BIG, launch=1.0, cores=cores), base),
            ("messages", KernelModel(flops=BIG, copy_bw=BIG, cores=cores),
             replace(base, latency=1.0))):
        shape = (1, TOKENS, HEADS, DIM)
        est = ringmem.plan(shape, shape, world=world, dtype=torch.float32, device_type="cpu",
                           layout="zigzag", causal=True, schedule="kv", kernel=k,
                           interconnect=link).schedules["kv"]
        out[term] = est.time_s
    return out


def measure_host(worlds: tuple[int, ...] = (1, 2, 3, 4), repeats: int = 200,
                 cores: int | None = None) -> dict[str, Any]:
    """Measure at each world (one torchrun each) and solve for the per-call and per-step
    costs (module doc). `cores`: the cores the ranks share (default: this machine's)."""
    import os
    if 1 not in worlds or len([w for w in worlds if w > 1]) < 1:
        raise ValueError(f"worlds must hold 1 and a world > 1, got {worlds!r}")
    cores = cores or os.cpu_count() or 1
    measured: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for w in worlds:
            out = Path(tmp) / f"w{w}.json"
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc-per-node={w}", "-m", "ringmem.sim.host", "--worker",
                            str(out), str(repeats)], check=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
            measured[w] = json.loads(out.read_text()) | counts(w, cores)
    one, fit_w = measured[1], min(w for w in worlds if w > 1)
    two = measured[fit_w]
    step = (two["run"] - two["blocks"] * two["block"]
            - two["messages"] * two["message"]) / two["steps"]
    res = {"cores": cores, "repeats": repeats, "fitted_on_world": fit_w, "step_s": step,
           "call_s": one["agreed"], "latency_s": two["message"],
           "bandwidth": two["bandwidth"],
           "agree_s": [measured[w]["agreed"] - one["agreed"] for w in sorted(measured)
                       if w > 1],
           # an all-to-all's cost over one message's (the link model's share of it)
           "a2a_s": [max(0.0, measured[w]["all_to_all"] - measured[w]["message"])
                     for w in sorted(measured) if w > 1],
           "worlds": {str(w): m for w, m in sorted(measured.items())}}
    for w, m in measured.items():  # the loop at every world from the same costs
        share = max(1.0, w / cores)
        m["predicted_run"] = (m["steps"] * step + m["blocks"] * two["block"]
                              + m["messages"] * two["message"] * share)
    return res

if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        _worker(sys.argv[2], int(sys.argv[3]))
    else:
        print(json.dumps(measure_host(), indent=1))
