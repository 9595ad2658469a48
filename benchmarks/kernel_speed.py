"""Triton kernels vs PyTorch SDPA flash and the GPU's read bandwidth, outputs checked.

Block attention fwd/bwd against SDPA's flash backend (MHA and GQA), split-KV decode and the
paged run-list decode against the device's read bandwidth, with each kernel's output
checked in the same run.

Run: python benchmarks/kernel_speed.py [--quick] [--repeats N]   (CUDA only; `--help` anywhere)
Without CUDA or triton it says why, lists what it would run, and exits 2.

FLOPs (Triton tutorial convention): forward 4 * B * Hq * S^2 * D, x0.5 when causal;
backward 2.5x the forward. Decode GB/s counts the K and V bytes read once.
Read bandwidth: bytes read per second by a large reduction `x.sum()` (2 GiB fp32; it writes
one scalar), the ceiling of a kernel that only reads. Copy bandwidth, reported for
reference: (bytes read + bytes written) per second of a 2 GiB `dst.copy_(src)`.
SDPA runs GQA shapes on K/V expanded to Hq heads beforehand (outside the timing).
Paged decode: pools of 2x the context, the keys in runs of `--page` slots with a gap after
each; its time includes building the split table on the host.
Targets: forward >= 0.9x SDPA flash, backward >= 0.8x, decode >= 70% of read bandwidth.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from _common import git_commit

TARGETS = {"fwd": 0.9, "bwd": 0.8, "decode": 0.7}
CHECK_REL = 2e-2  # max |err| / max |ref| allowed between two bf16 kernels
DEVICE, DTYPE = "cuda", torch.bfloat16


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlens", default="4096,16384,65536")
    p.add_argument("--dims", default="64,128")
    p.add_argument("--heads", default="32:32,32:8", help="attention q:kv head counts")
    p.add_argument("--contexts", default="16384,131072,1048576", help="decode K/V lengths")
    p.add_argument("--decode-shapes", default="32:8:128,32:8:64",
                   help="decode q heads:kv heads:head dim")
    p.add_argument("--page", type=int, default=256, help="slots per run (paged decode)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default="benchmarks/results/kernels.md")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    a = p.parse_args()
    if a.quick:
        a.seqlens, a.contexts, a.repeats = "4096", "16384", 5
    return a


def attention_cases(a: argparse.Namespace) -> list[dict[str, Any]]:
    """B=1; Hq = 32 at D <= 64, 16 at D = 128 (~3 GiB at 64K), KV heads in the same ratio."""
    cases = []
    for s in map(int, a.seqlens.split(",")):
        for d in map(int, a.dims.split(",")):
            for hq, hkv in (map(int, h.split(":")) for h in a.heads.split(",")):
                div = 1 if d <= 64 else 2  # half the heads at D = 128: same bytes
                cases += [{"S": s, "D": d, "Hq": hq // div, "Hkv": max(1, hkv // div),
                           "causal": c} for c in (False, True)]
    return cases


def decode_shapes(a: argparse.Namespace) -> list[dict[str, int]]:
    return [dict(zip(("Hq", "Hkv", "D"), map(int, s.split(":"))))
            for s in a.decode_shapes.split(",")]


def cuda_ms(fn: Callable[[], Any], warmup: int, repeats: int) -> float:
    """Median CUDA-event time of fn in ms; L2 flushed before each timed call."""
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=DEVICE)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bandwidths(a: argparse.Namespace, nbytes: int = 2 * 2**30) -> dict[str, float]:
    """Read bandwidth (x.sum(): bytes read / s) and copy bandwidth ((read + written) / s)."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=DEVICE)
    read = nbytes / (cuda_ms(lambda: x.sum(), a.warmup, a.repeats) * 1e-3)
    y = torch.empty_like(x)
    copy = 2 * nbytes / (cuda_ms(lambda: y.copy_(x), a.warmup, a.repeats) * 1e-3)
    return {"read_bytes_per_s": read, "copy_rw_bytes_per_s": copy}


def flash_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
              scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's flash op on [B, H, S, D] (same head count): (out, lse [B, H, Sq] fp32)."""
    res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False,
                                                             scale=scale)
    return res[0], res[1][..., : q.shape[2]]


def compare(got: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    err = (got.float() - ref.float()).abs().max().item()
    return {"max_abs_err": err, "rel": err / max(ref.float().abs().max().item(), 1e-30)}


def bench_attention(c: dict[str, Any], a: argparse.Namespace) -> dict[str, Any]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ringmem.kernels.attention import attention_fwd
    from ringmem.kernels.backward import attention_bwd
    s, d, hq, hkv, causal = c["S"], c["D"], c["Hq"], c["Hkv"], c["causal"]
    g, scale = hq // hkv, d ** -0.5
    q, dout = (torch.randn(1, s, hq, d, device=DEVICE, dtype=DTYPE) for _ in range(2))
    k, v = (torch.randn(1, s, hkv, d, device=DEVICE, dtype=DTYPE) for _ in range(2))
    t = lambda x: x.transpose(1, 2)  # [B, S, H, D] <-> SDPA's [B, H, S, D], a view
    out, lse = attention_fwd(q, k, v, scale, causal)
    fwd_ms = cuda_ms(lambda: attention_fwd(q, k, v, scale, causal), a.warmup, a.repeats)
    grads = attention_bwd(dout, q, k, v, out, lse, scale, causal)
    bwd_ms = cuda_ms(lambda: attention_bwd(dout, q, k, v, out, lse, scale, causal),
                     a.warmup, a.repeats)
    qs = t(q).detach().requires_grad_()
    ks, vs = (t(x).repeat_interleave(g, 1).detach().requires_grad_() for x in (k, v))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        sdpa = lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale)
        sdpa_fwd_ms = cuda_ms(sdpa, a.warmup, a.repeats)
        out_s = sdpa()
    do_s = t(dout)
    sdpa_bwd = lambda: torch.autograd.grad(out_s, (qs, ks, vs), do_s, retain_graph=True)
    sdpa_bwd_ms = cuda_ms(sdpa_bwd, a.warmup, a.repeats)
    dq_s, dk_s, dv_s = sdpa_bwd()
    fold = lambda x: t(x.unflatten(1, (hkv, g)).sum(2))  # expanded heads -> KV heads
    ref_out, ref_lse = flash_ref(qs.detach(), ks.detach(), vs.detach(), causal, scale)
    checks = {"out": compare(out, t(ref_out)), "lse": compare(lse, ref_lse)}
    checks.update({n: compare(gr, r) for n, gr, r in
                   zip(("dq", "dk", "dv"), grads, (t(dq_s), fold(dk_s), fold(dv_s)))})
    flops = 4 * hq * s * s * d * (0.5 if causal else 1.0)
    row = dict(c, fwd_ms=fwd_ms, bwd_ms=bwd_ms, sdpa_fwd_ms=sdpa_fwd_ms, sdpa_bwd_ms=sdpa_bwd_ms,
               fwd_tflops=flops / fwd_ms * 1e-9, sdpa_fwd_tflops=flops / sdpa_fwd_ms * 1e-9,
               bwd_tflops=2.5 * flops / bwd_ms * 1e-9,
               sdpa_bwd_tflops=2.5 * flops / sdpa_bwd_ms * 1e-9, checks=checks,
               correct=all(x["rel"] <= CHECK_REL for x in checks.values()))
    row.update(fwd_ratio=sdpa_fwd_ms / fwd_ms, bwd_ratio=sdpa_bwd_ms / bwd_ms)
    row.update(fwd_pass=row["fwd_ratio"] >= TARGETS["fwd"],
               bwd_pass=row["bwd_ratio"] >= TARGETS["bwd"])
    return row


def paged_pools(k: torch.Tensor, v: torch.Tensor, page: int
                ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Pools [Hkv, 2 * Sk, D] holding k/v [1, Sk, Hkv, D] in runs of `page` slots, a gap
    of `page` after each; the runs list in key order."""
    sk, hkv, d = k.shape[1:]
    runs = [(2 * lo, 2 * lo + min(page, sk - lo)) for lo in range(0, sk, page)]
    pools = []
    for x in (k, v):
        pool = torch.zeros(hkv, 2 * sk, d, dtype=x.dtype, device=x.device)
        idx = torch.cat([torch.arange(lo, hi, device=x.device) for lo, hi in runs])
        pool[:, idx] = x[0].transpose(0, 1)
        pools.append(pool)
    return pools[0], pools[1], runs


def bench_decode(shape: dict[str, int], sk: int, read_bw: float,
                 a: argparse.Namespace) -> dict[str, Any]:
    from ringmem.kernels.decode import decode_partial, decode_runs
    hq, hkv, d = shape["Hq"], shape["Hkv"], shape["D"]
    g, scale = hq // hkv, d ** -0.5
    q = torch.randn(1, 1, hq, d, device=DEVICE, dtype=DTYPE)
    k, v = (torch.randn(1, sk, hkv, d, device=DEVICE, dtype=DTYPE) for _ in range(2))
    ms = cuda_ms(lambda: decode_partial(q, k, v, scale), a.warmup, a.repeats)
    out, lse = decode_partial(q, k, v, scale)
    # exact SDPA reference without copying K/V: non-causal, so the G query heads of each
    # KV head can be stacked along the query axis -> [B, Hkv, G, D]
    qg = q.view(1, hkv, g, d)
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
    sdpa = lambda: flash_ref(qg, kt, vt, False, scale)
    sdpa_ms = cuda_ms(sdpa, a.warmup, a.repeats)
    ref_out, ref_lse = sdpa()
    ref_out, ref_lse = ref_out.reshape(1, 1, hq, d), ref_lse.reshape(1, hq, 1)
    kp, vp, runs = paged_pools(k, v, a.page)
    paged = lambda: decode_runs(q[0, 0], kp, vp, runs, scale)
    paged_ms = cuda_ms(paged, a.warmup, a.repeats)
    p_out, p_lse = paged()
    checks = {"out": compare(out, ref_out), "lse": compare(lse, ref_lse),
              "paged out": compare(p_out, ref_out[0, 0]),
              "paged lse": compare(p_lse, ref_lse[0, :, 0])}
    nbytes = 2 * k.numel() * k.element_size()
    frac = lambda t: nbytes / (t * 1e-3) / read_bw
    return {"Sk": sk, **shape, "page": a.page, "runs": len(runs), "ms": ms,
            "paged_ms": paged_ms, "sdpa_ms": sdpa_ms, "kv_bytes": nbytes,
            "GB_s": nbytes / (ms * 1e-3) / 1e9, "paged_GB_s": nbytes / (paged_ms * 1e-3) / 1e9,
            "sdpa_GB_s": nbytes / (sdpa_ms * 1e-3) / 1e9, "read_fraction": frac(ms),
            "paged_read_fraction": frac(paged_ms), "pass": frac(ms) >= TARGETS["decode"],
            "paged_pass": frac(paged_ms) >= TARGETS["decode"], "checks": checks,
            "correct": all(x["rel"] <= CHECK_REL for x in checks.values())}


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def tables(rows: list[dict[str, Any]], dec: list[dict[str, Any]], bw: dict[str, float]
           ) -> list[str]:
    errs = lambda r: ", ".join(f"{n} {x['max_abs_err']:.1e}" for n, x in r["checks"].items())
    lines = ["| S | D | Hq | Hkv | causal | fwd TFLOP/s (SDPA) | fwd ratio | bwd TFLOP/s (SDPA) "
             "| bwd ratio | max abs err vs SDPA |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['S']} | {r['D']} | {r['Hq']} | {r['Hkv']} | {r['causal']} | "
              f"{r['fwd_tflops']:.0f} ({r['sdpa_fwd_tflops']:.0f}) | {r['fwd_ratio']:.2f} "
              f"{verdict(r['fwd_pass'])} | {r['bwd_tflops']:.0f} ({r['sdpa_bwd_tflops']:.0f}) | "
              f"{r['bwd_ratio']:.2f} {verdict(r['bwd_pass'])} | {errs(r)}"
              f"{'' if r['correct'] else ' MISMATCH'} |" for r in rows]
    lines += ["", f"Decode (B=1, one query token, {str(DTYPE).removeprefix('torch.')}); read "
              f"bandwidth {bw['read_bytes_per_s'] / 1e9:.0f} GB/s (x.sum(), bytes read per "
              f"second); copy {bw['copy_rw_bytes_per_s'] / 1e9:.0f} GB/s (read + written)", "",
              "| Sk | Hq | Hkv | D | contiguous ms | GB/s (of read bw) | paged runs | paged ms | "
              "paged GB/s (of read bw) | SDPA GB/s | max abs err vs SDPA |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['Sk']:,} | {r['Hq']} | {r['Hkv']} | {r['D']} | {r['ms']:.3f} | "
              f"{r['GB_s']:.0f} ({r['read_fraction']:.0%} {verdict(r['pass'])}) | {r['runs']} | "
              f"{r['paged_ms']:.3f} | {r['paged_GB_s']:.0f} ({r['paged_read_fraction']:.0%} "
              f"{verdict(r['paged_pass'])}) | {r['sdpa_GB_s']:.0f} | {errs(r)}"
              f"{'' if r['correct'] else ' MISMATCH'} |" for r in dec]
    return lines


def report(a: argparse.Namespace, rows: list[dict[str, Any]], dec: list[dict[str, Any]],
           bw: dict[str, float]) -> None:
    import triton
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(), "machine": platform.platform(),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "cuda": torch.version.cuda, "triton": triton.__version__,
                         "git": git_commit()},
            "config": {**vars(a), "dtype": str(DTYPE), "B": 1}, "targets": TARGETS, **bw}
    ok = (all(r["fwd_pass"] and r["bwd_pass"] and r["correct"] for r in rows)
          and all(r["pass"] and r["paged_pass"] and r["correct"] for r in dec))
    lines = tables(rows, dec, bw)
    summary = (f"All targets met and outputs match SDPA: {verdict(ok)} (forward >= "
               f"{TARGETS['fwd']}x SDPA flash, backward >= {TARGETS['bwd']}x, decode >= "
               f"{TARGETS['decode']:.0%} of read bandwidth, contiguous and paged; errors "
               f"within {CHECK_REL} of max |ref|).")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join([
        "# Triton kernels vs PyTorch SDPA (flash backend)", "",
        f"- date: {meta['date']}", f"- device: {meta['device']}",
        f"- versions: {meta['versions']}", f"- config: {meta['config']}",
        "- FLOPs: forward 4*B*Hq*S^2*D (x0.5 causal), backward 2.5x forward; ratio = SDPA "
        "time / Triton time. Triton gradients are fp32, SDPA's bf16; SDPA runs GQA on K/V "
        "expanded beforehand.",
        "- read bandwidth: bytes read per second by x.sum() of 2 GiB; decode GB/s counts the "
        "K+V bytes read once; paged decode time includes its host-side split table.", "",
        *lines, "", summary, ""]))
    out.with_suffix(".json").write_text(json.dumps(
        {**meta, "attention": rows, "decode": dec, "all_pass": ok}, indent=2) + "\n")
    print("\n".join(lines + ["", summary]), flush=True)
    print(f"wrote {out}, {out.with_suffix('.json')}", flush=True)


def main() -> int:
    a = parse()
    cases, contexts = attention_cases(a), [int(x) for x in a.contexts.split(",")]
    shapes = decode_shapes(a)
    why = None
    if not torch.cuda.is_available():
        why = "CUDA is not available (this benchmark times compiled kernels on a GPU)"
    else:
        try:
            import triton  # noqa: F401
        except ImportError:
            why = "triton is not installed"
    if why:
        print(f"{why}: nothing measured, no report written. Would run:", file=sys.stderr)
        for c in cases:
            print(f"  attention fwd+bwd vs SDPA flash, bf16, B=1, S={c['S']}, D={c['D']}, "
                  f"Hq={c['Hq']}, Hkv={c['Hkv']}, causal={c['causal']}", file=sys.stderr)
        for sh in shapes:
            for sk in contexts:
                print(f"  decode_partial + decode_runs (runs of {a.page}), bf16, Sk={sk}, {sh}, "
                      "vs read bandwidth", file=sys.stderr)
        return 2
    try:
        from tqdm import tqdm
        bar = tqdm(total=1 + len(cases) + len(contexts) * len(shapes))
        tick = lambda msg: (bar.set_description(msg), bar.update(1))
    except ImportError:
        bar, tick = None, lambda msg: print(msg, flush=True)
    bw = bandwidths(a)
    torch.cuda.empty_cache()  # the 4 GiB of the bandwidth probes
    tick("bandwidth")
    rows = []
    for c in cases:
        rows.append(bench_attention(c, a))
        torch.cuda.empty_cache()
        tick(f"attention S={c['S']} D={c['D']} Hkv={c['Hkv']} causal={c['causal']}")
    dec = []
    for sh in shapes:
        for sk in contexts:
            dec.append(bench_decode(sh, sk, bw["read_bytes_per_s"], a))
            torch.cuda.empty_cache()
            tick(f"decode {sh} Sk={sk}")
    if bar:
        bar.close()
    report(a, rows, dec, bw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
