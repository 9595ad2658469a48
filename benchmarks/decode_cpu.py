"""The compiled CPU decode kernel against the memory-bandwidth floor.

Run: python benchmarks/decode_cpu.py [--quick]

One decode query over a KV head's pool per call, the config of issue 27: 256K keys per
rank, D = 128, bf16, 32 query heads over 8 KV heads (4 query rows per KV head), 1 thread
and then all threads. The floor is a plain read of the same K and V bytes by the same
extension (`read`: 64-byte loads, split over the threads like `decode`); the kernel's
bytes/s over the read's is the target (>= 70%). The torch path (`partial.attend`, what
decode ran before) is timed beside it. Medians and min-max over --repeats calls.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from _common import git_commit, machine

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def times(fn, repeats: int) -> list[float]:
    fn()  # warm: page faults, the build
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keys", type=int, default=262144)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="32K keys, 3 repeats")
    p.add_argument("--out", default="benchmarks/results/decode_cpu.md")
    a = p.parse_args()
    if a.quick:
        a.keys, a.repeats = 32768, 3
    from ringmem.backends import get_backend
    from ringmem.partial import attend
    dt = DTYPES[a.dtype]
    be = get_backend("cpu", torch.device("cpu"), dt, a.dim)
    ext = be.kernel()
    if ext is None:
        raise SystemExit("the CPU kernel could not be built here: see the log line above")
    g = torch.Generator().manual_seed(0)
    k = torch.randn(a.kv_heads, a.keys, a.dim, generator=g).to(dt)
    v = torch.randn(a.kv_heads, a.keys, a.dim, generator=g).to(dt)
    q = torch.randn(a.q_heads, a.dim, generator=g).to(dt)
    runs, scale = [(0, a.keys)], a.dim ** -0.5
    nbytes = 2 * k.numel() * k.element_size()
    rows = []
    for threads in sorted({1, torch.get_num_threads()}):
        torch.set_num_threads(threads)
        read = times(lambda: (ext.read(k), ext.read(v)), a.repeats)
        kern = times(lambda: be.decode(q, k, v, runs, scale), a.repeats)
        ref = times(lambda: attend(q, k, v, scale, runs=runs), max(3, a.repeats // 2))
        med = {n: statistics.median(t) for n, t in (("read", read), ("kernel", kern),
                                                    ("torch", ref))}
        rows.append({"threads": threads, "read_s": read, "kernel_s": kern, "torch_s": ref,
                     "read_GBps": nbytes / med["read"] / 1e9,
                     "kernel_GBps": nbytes / med["kernel"] / 1e9,
                     "torch_GBps": nbytes / med["torch"] / 1e9,
                     "kernel_over_read": med["read"] / med["kernel"]})
    # exactness at this size, against the torch path and a float64 reference of one head
    got = be.decode(q, k, v, runs, scale)
    qs = q[:a.q_heads // a.kv_heads].double() * scale
    s = qs @ k[0].double().T
    ref0 = torch.softmax(s, -1) @ v[0].double()
    err = (got.out[:a.q_heads // a.kv_heads].double() - ref0).abs().max().item()
    base = attend(q, k, v, scale, runs=runs)
    err_torch = (base.out[:a.q_heads // a.kv_heads].double() - ref0).abs().max().item()
    cfg = {k2: v2 for k2, v2 in vars(a).items() if k2 != "out"}
    info = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "commit": git_commit(), "machine": machine(), "torch": torch.__version__,
            "isa": ext.isa(), "config": cfg, "bytes_per_call": nbytes, "rows": rows,
            "max_err_head0_vs_fp64": {"kernel": err, "torch_path": err_torch}}
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps(info, indent=1))
    lines = ["# Compiled CPU decode kernel vs the memory-bandwidth floor", "",
             f"- date: {info['date']}, commit {info['commit']}",
             f"- machine: {info['machine']}; torch {torch.__version__}; kernel path: "
             f"{info['isa']}",
             f"- config: {cfg}; {nbytes / 2**20:.0f} MiB of K and V per call", "",
             "| threads | plain read GB/s | kernel GB/s | kernel / read | torch path GB/s "
             "| kernel ms (median, min-max) | torch path ms |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        km = [x * 1e3 for x in r["kernel_s"]]
        lines.append(f"| {r['threads']} | {r['read_GBps']:.1f} | {r['kernel_GBps']:.1f} | "
                     f"{100 * r['kernel_over_read']:.0f}% | {r['torch_GBps']:.1f} | "
                     f"{statistics.median(km):.1f} ({min(km):.1f}-{max(km):.1f}) | "
                     f"{1e3 * statistics.median(r['torch_s']):.1f} |")
    one = rows[0]
    verdict = "PASS" if one["kernel_over_read"] >= 0.7 else "FAIL"
    lines += ["", f"1 thread: the kernel streams {100 * one['kernel_over_read']:.0f}% of a "
              f"plain read's bytes/s (target >= 70%): {verdict}. Max |error| of KV head 0's "
              f"rows against float64: kernel {err:.2e}, torch path {err_torch:.2e} (the torch "
              f"path rounds scores and probabilities to {a.dtype}; the kernel keeps scores "
              f"in fp32" + (", probabilities rounded to bf16 for the V product by dpbf16"
                           if a.dtype == "bf16" and info["isa"] == "avx512_bf16" else "") + ")."]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
