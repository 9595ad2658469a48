"""Measure a device profile: block kernel times over a grid of shapes, fitted to the model.

`ringmem bench calibrate` runs this on the current device (the CPU here, CUDA when there is
one) with the backend ringmem's ring loop would pick (`backend="auto"`), and writes a JSON
profile: the measured table and the fitted roofline (rate, per-launch overhead, causal
efficiency) plus the memory bandwidth of the merge epilogue.
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from functools import partial
from typing import Any

from .kernel import Profile, piece_flops

# (rows, keys, causal): small enough for < 2 minutes on 2 CPU cores at 8 heads, D=64; the
# one-row and 64-row entries give the measured rate of decode-shaped launches
CPU_GRID = {"fwd": ((1, 32768, False), (64, 8192, False), (512, 512, False),
                    (1024, 1024, False), (2048, 2048, False), (2048, 4096, False),
                    (4096, 4096, False), (1024, 1024, True), (2048, 2048, True),
                    (4096, 4096, True)),
            "bwd": ((1, 32768, False), (1024, 1024, False), (2048, 2048, False),
                    (2048, 4096, False), (2048, 2048, True), (4096, 4096, True))}
CUDA_GRID = {ph: ((1, 65536, False), (1024, 1024, False), (2048, 2048, False),
                  (4096, 4096, False), (4096, 8192, False), (8192, 8192, False),
                  (16384, 16384, False), (2048, 2048, True), (8192, 8192, True),
                  (16384, 16384, True))
             for ph in ("fwd", "bwd")}


def _best_s(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> float:
    """The fastest of `repeats` timed calls (after a warm-up): on a shared machine the
    minimum is the run least disturbed by other work."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def pairs_of(rows: int, keys: int, causal: bool) -> float:
    """Unmasked pairs of a block whose causal diagonal ends at its bottom-right corner."""
    if not causal:
        return float(rows * keys)
    off = keys - rows  # row i sees keys [0, off + i]
    return float(sum(min(keys, max(0, off + i + 1)) for i in range(rows)))


def measure(device: str = "cpu", *, heads: int = 8, dim: int = 64, dtype: str = "fp32",
            grid: dict | None = None, repeats: int = 3,
            progress: Callable[[Iterable], Iterable] | None = None) -> list[tuple]:
    """[(phase, rows, keys, pairs, seconds, FLOPs)] of ringmem's auto backend on `device`."""
    import torch

    from ..backends import get_backend
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    dev = torch.device(device)
    be = get_backend("auto", dev, dt, dim)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    grid = grid or (CUDA_GRID if dev.type == "cuda" else CPU_GRID)
    jobs = [(ph, *g) for ph in ("fwd", "bwd") for g in grid[ph]]
    out = []
    g = torch.Generator(device=dev).manual_seed(0)
    for ph, rows, keys, causal in (progress(jobs) if progress else jobs):
        q = torch.randn(1, rows, heads, dim, device=dev, dtype=dt, generator=g)
        k, v = (torch.randn(1, keys, heads, dim, device=dev, dtype=dt, generator=g)
                for _ in range(2))
        scale = dim ** -0.5
        with torch.no_grad():
            o, lse = be.fwd(q, k, v, scale, causal)
            if ph == "fwd":
                t = _best_s(partial(be.fwd, q, k, v, scale, causal), repeats, sync)
            else:
                do = torch.randn_like(o)
                t = _best_s(partial(be.bwd, do, q, k, v, o, lse, scale, causal), repeats,
                              sync)
        pairs = pairs_of(rows, keys, causal)
        flops = piece_flops(rows, keys, pairs, heads, 1, dim, ph)
        out.append((ph, rows, keys, pairs, t, flops))
    return out


def measure_merge_bw(device: str = "cpu", elems: int = 1 << 22) -> float:
    """B/s of ringmem's forward merge epilogue (upcast, scale, fused multiply-add)."""
    import torch
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    acc = torch.randn(elems, device=dev)
    blk = torch.randn(elems, device=dev, dtype=torch.bfloat16)
    a, b = torch.rand(elems, device=dev), torch.rand(elems, device=dev)

    def merge() -> None:
        acc.mul_(a).addcmul_(blk.to(acc.dtype), b)
    t = _best_s(merge, 5, sync)
    return elems * (2 + 6 * 4) / t


def fit(table: list[tuple], *, mem_bw: float, name: str, units: int = 1,
        sources: tuple[str, ...] = (), notes: str = "") -> Profile:
    """Least-squares roofline per phase over the large unmasked entries (t = launch +
    F / rate); the profile keeps the table, from which the model interpolates the unmasked
    rate over query rows (few rows, as in decode, run far slower); then the causal
    efficiency as the median ratio of that rate's time to the measured compute time of the
    masked entries."""
    rates, launch = {}, []
    for ph in ("fwd", "bwd"):
        pts = [(fl, t) for f, r, k, p, t, fl in table if f == ph and p >= r * k and r >= 512]
        if len(pts) < 2:
            raise ValueError(f"need >= 2 unmasked {ph} entries to fit, got {len(pts)}")
        n = len(pts)
        mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
        slope = (sum((x - mx) * (y - my) for x, y in pts)
                 / sum((x - mx) ** 2 for x, _ in pts))
        if not slope > 0:
            raise ValueError(f"{ph} times do not grow with FLOPs: {pts}")
        rates[ph] = 1 / slope
        launch.append(max(0.0, my - slope * mx))
    prof = Profile(name=name, fwd_flops=rates["fwd"], bwd_flops=rates["bwd"],
                   launch_s=statistics.fmean(launch), mem_bw=mem_bw, units=units,
                   sources=sources, notes=notes, table=tuple(tuple(t) for t in table))
    ce = [fl / prof.table_rate(f, r) / (t - prof.launch_s)
          for f, r, k, p, t, fl in table if p < r * k and t > prof.launch_s]
    return replace(prof, causal_efficiency=min(1.5, statistics.median(ce)) if ce else 1.0)


def calibrate(device: str = "cpu", *, threads: int | None = 1, heads: int | None = None,
              dim: int | None = None, dtype: str | None = None, repeats: int = 3,
              progress: Callable[[Iterable], Iterable] | None = None) -> Profile:
    """Measure and fit a profile of ringmem's auto backend on `device` (`threads` intra-op
    threads on CPU: 1 matches a torchrun rank)."""
    import platform

    import torch
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is visible")
    if threads is not None and device == "cpu":
        torch.set_num_threads(threads)
    gpu = device == "cuda"  # GPU: a Llama-like head shape; CPU: the CPU benchmarks' shape
    dtype = dtype or ("bf16" if gpu else "fp32")
    heads = heads or (32 if gpu else 8)
    dim = dim or (128 if gpu else 64)
    table = measure(device, heads=heads, dim=dim, dtype=dtype, repeats=repeats,
                    progress=progress)
    bw = measure_merge_bw(device)
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        name, units = f"{p.name} ({dtype}, measured)", p.multi_processor_count
    else:
        name, units = f"{platform.processor() or 'cpu'} x {threads} thread(s) ({dtype})", 1
    note = (f"measured by ringmem.sim.calibrate: heads={heads}, D={dim}, {dtype}, "
            f"torch {torch.__version__}, repeats={repeats}")
    prof = fit(table, mem_bw=bw, name=name, units=units, notes=note,
               sources=("measured on this machine",))
    if not math.isfinite(prof.fwd_flops):
        raise ValueError(f"calibration failed: {prof}")
    return prof
