"""Graphed decode (`ringmem.cache.GraphedDecode`) captured in a CUDA graph and replayed, checked
against the eager `ShardedKVCache.decode` of a twin cache, and the step times of both.

    python benchmarks/graphed_decode.py [--context 8192] [--layers 4] [--steps 20] [--out F]

On CUDA: one rank (NCCL cannot put two ranks on one GPU, so a captured collective of world > 1
is not exercised here). Every step of every layer and sequence is compared with float64
attention over the whole history: the graphed output within twice the error of plain
attention in the same dtype plus rounding (the tests' rule), else the run fails; the eager
step's error is reported beside it. On a CPU the same steps run without capture: a
smoke run of the script (the graph itself is then unverified).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from ringmem.cache import CacheConfig, GraphedDecode, ShardedKVCache
from ringmem.reference import masked_reference

from _common import git_commit, machine


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default="benchmarks/results/graphed_decode.md")
    return p.parse_args()


def main() -> int:
    a = parse()
    cuda = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    g = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, device=dev, dtype=dtype)  # noqa: E731
    cfg = CacheConfig(num_layers=a.layers, q_heads=a.q_heads, kv_heads=a.kv_heads,
                      head_dim=a.dim, capacity=a.batch * (a.context + a.steps + 256), page_size=256,
                      max_seqs=a.batch, dtype=dtype, device=dev)
    twin, cache = ShardedKVCache(cfg), ShardedKVCache(cfg)
    hist = {}  # (layer, sequence) -> float64 keys and values: the reference's
    for lay in range(a.layers):
        for s in range(a.batch):
            k, v = rnd(1, a.context, a.kv_heads, a.dim), rnd(1, a.context, a.kv_heads, a.dim)
            for c in (twin, cache):
                c.prefill_chunk(lay, torch.zeros_like(rnd(1, a.context, a.q_heads, a.dim)),
                                k, v, seq=s)
            hist[lay, s] = [k.double(), v.double()]
    dec = GraphedDecode(cache)
    qs = [rnd(a.batch, 1, a.q_heads, a.dim) for _ in range(a.layers)]
    ks = [rnd(a.batch, 1, a.kv_heads, a.dim) for _ in range(a.layers)]
    vs = [rnd(a.batch, 1, a.kv_heads, a.dim) for _ in range(a.layers)]

    def step() -> list[torch.Tensor]:
        return [dec.attend(lay, qs[lay], ks[lay], vs[lay]) for lay in range(a.layers)]

    def fresh() -> None:
        for x in (*qs, *ks, *vs):
            x.copy_(torch.randn(x.shape, generator=g, device=dev, dtype=dtype))

    errs, fails, times = [], [], {"eager decode": [], "graphed, eager": [], "plan": [],
                                  "graphed, replay": []}
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def check(outs: list[torch.Tensor], wants: list[torch.Tensor], i: int) -> None:
        """Each (layer, sequence) against float64, within twice the error of plain attention
        in the cache's dtype (the same-dtype baseline) plus rounding."""
        for (lay, s), h in hist.items():
            hist[lay, s] = [torch.cat([x, y[s:s + 1].double()], 1)
                            for x, y in zip(h, (ks[lay], vs[lay]))]
            keep = torch.ones(1, hist[lay, s][0].shape[1], dtype=torch.bool, device=dev)
            q = qs[lay][s:s + 1].double()
            ref, _ = masked_reference(q, *hist[lay, s], keep)
            low, _ = masked_reference(*(t.to(dtype) for t in (q, *hist[lay, s])), keep)
            base = (low.double() - ref).abs().max().item()  # the same-dtype baseline
            err = (outs[lay][s:s + 1].double() - ref).abs().max().item()
            bound = 2 * base + 2 * torch.finfo(dtype).eps * ref.abs().max().item()
            errs.append((err, (wants[lay][s:s + 1].double() - ref).abs().max().item()))
            if not err <= bound:
                fails.append(f"step {i} layer {lay} seq {s}: graphed vs float64 {err:.3e} "
                             f"> {bound:.3e}")

    def timed_step(fn, key: str) -> list[torch.Tensor]:
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times[key].append(time.perf_counter() - t0)
        return out

    def eager() -> list[torch.Tensor]:
        return [twin.decode(lay, qs[lay], ks[lay], vs[lay]) for lay in range(a.layers)]

    side = torch.cuda.Stream() if cuda else None  # warm-up off the capture's stream
    if side is not None:
        side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        for i in range(3):  # warm-up, eager (NCCL and the allocator see every op once)
            fresh()
            t0 = time.perf_counter()
            dec.plan()
            times["plan"].append(time.perf_counter() - t0)
            outs = timed_step(step, "graphed, eager")
            check(outs, timed_step(eager, "eager decode"), i)
    if side is not None:
        torch.cuda.current_stream().wait_stream(side)
    graph = None
    if cuda:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # records the kernels; runs and plans nothing
            outs = step()
    for i in range(3, 3 + a.steps):
        fresh()
        t0 = time.perf_counter()
        dec.plan()
        times["plan"].append(time.perf_counter() - t0)
        if graph is not None:
            timed_step(graph.replay, "graphed, replay")
        else:
            outs = timed_step(step, "graphed, eager")
        check(outs, timed_step(eager, "eager decode"), i)
    dec.check()
    rows = {k: (statistics.median(v) * 1e3, min(v) * 1e3, max(v) * 1e3)
            for k, v in times.items() if v}
    rep = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "commit": git_commit(), "machine": machine(), "torch": torch.__version__,
           "device": torch.cuda.get_device_name() if cuda else "cpu (no capture)",
           "config": vars(a) | {"dtype": str(dtype)}, "ms_median_min_max": rows,
           "max_err_graphed_vs_float64": max(e for e, _ in errs),
           "max_err_eager_vs_float64": max(b for _, b in errs), "failures": fails}
    lines = [f"# Graphed decode ({rep['device']})", "",
             f"{rep['date']}, commit {rep['commit']}, torch {rep['torch']}; "
             f"{a.layers} layers x {a.batch} sequence(s) x {a.context} tokens, "
             f"{a.q_heads}/{a.kv_heads} heads x {a.dim}, {dtype}; {a.steps} steps", "",
             "| per token step (all layers) | median ms | min | max |", "|---|---|---|---|"]
    lines += [f"| {k} | {m:.3f} | {lo:.3f} | {hi:.3f} |" for k, (m, lo, hi) in rows.items()]
    lines += ["", f"Max error against float64 over every step, layer and sequence: graphed "
              f"{rep['max_err_graphed_vs_float64']:.3e}, eager "
              f"{rep['max_err_eager_vs_float64']:.3e}; failures: {len(fails)}"]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines + [""] + fails) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rep, indent=1) + "\n")
    print("\n".join(lines + fails))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
