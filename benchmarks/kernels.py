"""Triton kernels vs PyTorch: block attention fwd/bwd against SDPA's flash backend, split-KV
decode against the device's copy bandwidth, with each kernel's output checked in the same run.

Run: python benchmarks/kernels.py [--quick] [--repeats N]
Needs CUDA and triton; without them it prints what it would run and exits 0.

FLOPs (Triton tutorial convention): forward 4 * B * H * S^2 * D, x0.5 when causal; backward
2.5x the forward. Decode GB/s counts the K and V bytes read once. Copy bandwidth counts bytes
copied per second, i.e. (bytes read + bytes written) / 2 of a large `dst.copy_(src)`.
Targets: forward >= 0.9x SDPA flash, backward >= 0.8x, decode >= 70% of copy bandwidth.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from _common import git_commit

TARGETS = {"fwd": 0.9, "bwd": 0.8, "decode": 0.7}
CHECK_REL = 2e-2  # max |err| / max |ref| allowed between two bf16 kernels


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlens", default="4096,16384,65536")
    p.add_argument("--dims", default="64,128")
    p.add_argument("--contexts", default="16384,131072,1048576", help="decode K/V lengths")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default="benchmarks/results/kernels.md")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    a = p.parse_args()
    if a.quick:
        a.seqlens, a.contexts, a.repeats = "4096", "16384", 5
    return a


def attention_cases(a: argparse.Namespace) -> list[dict[str, Any]]:
    """B=1, Hq=Hkv: 32 heads at D=64, 16 at D=128 (~3 GiB at 64K: no need to reduce)."""
    cases = []
    for s in map(int, a.seqlens.split(",")):
        for d in map(int, a.dims.split(",")):
            h = 32 if d <= 64 else 16
            cases += [{"S": s, "D": d, "H": h, "causal": c} for c in (False, True)]
    return cases


DEVICE, DTYPE = "cuda", torch.bfloat16
DECODE = {"B": 1, "Sq": 1, "Hq": 32, "Hkv": 8, "D": 128}


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


def copy_bandwidth(a: argparse.Namespace, nbytes: int = 2 * 2**30) -> float:
    """Bytes copied per second by a large device-to-device copy (read + written, / 2)."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    bw = nbytes / (cuda_ms(lambda: dst.copy_(src), a.warmup, a.repeats) * 1e-3)
    del src, dst
    torch.cuda.empty_cache()
    return bw


def flash_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
              scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's flash op on [B, H, S, D]: (out, lse [B, H, Sq] fp32)."""
    if q.is_cuda:
        res = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, False, scale=scale)
    else:  # only for a dry run of this script under the Triton interpreter
        res = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, scale=scale)
    return res[0], res[1][..., : q.shape[2]]


def compare(got: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    err = (got.float() - ref.float()).abs().max().item()
    return {"max_abs_err": err, "rel": err / max(ref.float().abs().max().item(), 1e-30)}


def bench_attention(c: dict[str, Any], a: argparse.Namespace) -> dict[str, Any]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ringmem.kernels.attention import attention_bwd, attention_fwd
    s, d, h, causal = c["S"], c["D"], c["H"], c["causal"]
    scale = d ** -0.5
    q, k, v, dout = (torch.randn(1, s, h, d, device=DEVICE, dtype=DTYPE)
                     for _ in range(4))
    t = lambda x: x.transpose(1, 2)  # [B, S, H, D] <-> SDPA's [B, H, S, D], a view
    out, lse = attention_fwd(q, k, v, scale, causal)
    fwd_ms = cuda_ms(lambda: attention_fwd(q, k, v, scale, causal), a.warmup, a.repeats)
    grads = attention_bwd(dout, q, k, v, out, lse, scale, causal)
    bwd_ms = cuda_ms(lambda: attention_bwd(dout, q, k, v, out, lse, scale, causal),
                     a.warmup, a.repeats)
    qs, ks, vs = (t(x).detach().requires_grad_() for x in (q, k, v))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        sdpa = lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale)
        sdpa_fwd_ms = cuda_ms(sdpa, a.warmup, a.repeats)
        out_s = sdpa()
    do_s = t(dout)
    sdpa_bwd = lambda: torch.autograd.grad(out_s, (qs, ks, vs), do_s, retain_graph=True)
    sdpa_bwd_ms = cuda_ms(sdpa_bwd, a.warmup, a.repeats)
    ref_grads = [t(g) for g in sdpa_bwd()]
    ref_out, ref_lse = flash_ref(t(q), t(k), t(v), causal, scale)
    checks = {"out": compare(out, t(ref_out)), "lse": compare(lse, ref_lse)}
    checks.update({n: compare(g, r) for n, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)})
    flops = 4 * h * s * s * d * (0.5 if causal else 1.0)
    row = dict(c, fwd_ms=fwd_ms, bwd_ms=bwd_ms, sdpa_fwd_ms=sdpa_fwd_ms, sdpa_bwd_ms=sdpa_bwd_ms,
               fwd_tflops=flops / fwd_ms * 1e-9, sdpa_fwd_tflops=flops / sdpa_fwd_ms * 1e-9,
               bwd_tflops=2.5 * flops / bwd_ms * 1e-9,
               sdpa_bwd_tflops=2.5 * flops / sdpa_bwd_ms * 1e-9, checks=checks,
               correct=all(x["rel"] <= CHECK_REL for x in checks.values()))
    row["fwd_ratio"] = sdpa_fwd_ms / fwd_ms
    row["bwd_ratio"] = sdpa_bwd_ms / bwd_ms
    row["fwd_pass"] = row["fwd_ratio"] >= TARGETS["fwd"]
    row["bwd_pass"] = row["bwd_ratio"] >= TARGETS["bwd"]
    return row


def bench_decode(sk: int, copy_bw: float, a: argparse.Namespace) -> dict[str, Any]:
    from ringmem.kernels.decode import decode_partial
    b, sq, hq, hkv, d = (DECODE[x] for x in ("B", "Sq", "Hq", "Hkv", "D"))
    scale = d ** -0.5
    q = torch.randn(b, sq, hq, d, device=DEVICE, dtype=DTYPE)
    k, v = (torch.randn(b, sk, hkv, d, device=DEVICE, dtype=DTYPE) for _ in range(2))
    ms = cuda_ms(lambda: decode_partial(q, k, v, scale), a.warmup, a.repeats)
    out, lse = decode_partial(q, k, v, scale)
    # exact SDPA reference without copying K/V: non-causal, so the G query heads of each
    # KV head can be stacked along the query axis -> [B, Hkv, G * Sq, D]
    g = hq // hkv
    qg = q.view(b, sq, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, g * sq, d)
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
    sdpa = lambda: flash_ref(qg, kt, vt, False, scale)
    sdpa_ms = cuda_ms(sdpa, a.warmup, a.repeats)
    ref_out, ref_lse = sdpa()
    ref_out = ref_out.reshape(b, hkv, g, sq, d).permute(0, 3, 1, 2, 4).reshape(b, sq, hq, d)
    ref_lse = ref_lse.reshape(b, hq, sq)  # [B, Hkv, G * Sq] -> head h = kv * G + group
    checks = {"out": compare(out, ref_out), "lse": compare(lse, ref_lse)}
    nbytes = 2 * k.numel() * k.element_size()
    gbs = nbytes / (ms * 1e-3)
    return {"Sk": sk, **DECODE, "ms": ms, "kv_bytes": nbytes, "GB_s": gbs / 1e9,
            "sdpa_ms": sdpa_ms, "sdpa_GB_s": nbytes / (sdpa_ms * 1e-3) / 1e9,
            "copy_fraction": gbs / copy_bw, "pass": gbs / copy_bw >= TARGETS["decode"],
            "checks": checks, "correct": all(x["rel"] <= CHECK_REL for x in checks.values())}




def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def tables(rows: list[dict[str, Any]], dec: list[dict[str, Any]], copy_bw: float) -> list[str]:
    errs = lambda r: ", ".join(f"{n} {x['max_abs_err']:.1e}" for n, x in r["checks"].items())
    lines = ["| S | D | H | causal | fwd TFLOP/s (SDPA) | fwd ratio | bwd TFLOP/s (SDPA) | "
             "bwd ratio | max abs err vs SDPA |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['S']} | {r['D']} | {r['H']} | {r['causal']} | {r['fwd_tflops']:.0f} "
              f"({r['sdpa_fwd_tflops']:.0f}) | {r['fwd_ratio']:.2f} {verdict(r['fwd_pass'])} | "
              f"{r['bwd_tflops']:.0f} ({r['sdpa_bwd_tflops']:.0f}) | {r['bwd_ratio']:.2f} "
              f"{verdict(r['bwd_pass'])} | {errs(r)}{'' if r['correct'] else ' MISMATCH'} |"
              for r in rows]
    dc = DECODE
    lines += ["", f"Decode (B={dc['B']}, Sq={dc['Sq']}, {dc['Hq']} q heads, {dc['Hkv']} KV heads "
              f"x {dc['D']}, {str(DTYPE).removeprefix('torch.')}); copy bandwidth "
              f"{copy_bw / 1e9:.0f} GB/s (bytes copied per second)", "",
              "| Sk | ms | GB/s (K+V read) | SDPA GB/s | of copy bw | max abs err vs SDPA |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['Sk']:,} | {r['ms']:.3f} | {r['GB_s']:.0f} | {r['sdpa_GB_s']:.0f} | "
              f"{r['copy_fraction']:.0%} {verdict(r['pass'])} | {errs(r)}"
              f"{'' if r['correct'] else ' MISMATCH'} |" for r in dec]
    return lines


def report(a: argparse.Namespace, rows: list[dict[str, Any]], dec: list[dict[str, Any]],
           copy_bw: float) -> None:
    import triton
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(), "machine": platform.platform(),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "cuda": torch.version.cuda, "triton": triton.__version__,
                         "git": git_commit()},
            "config": {**vars(a), "decode": DECODE, "dtype": str(DTYPE), "B": 1},
            "targets": TARGETS, "copy_bytes_per_s": copy_bw}
    ok = (all(r["fwd_pass"] and r["bwd_pass"] and r["correct"] for r in rows)
          and all(r["pass"] and r["correct"] for r in dec))
    lines = tables(rows, dec, copy_bw)
    summary = (f"All targets met and outputs match SDPA: {verdict(ok)} (forward >= "
               f"{TARGETS['fwd']}x SDPA flash, backward >= {TARGETS['bwd']}x, decode >= "
               f"{TARGETS['decode']:.0%} of copy bandwidth; errors within {CHECK_REL} of "
               f"max |ref|).")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join([
        "# Triton kernels vs PyTorch SDPA (flash backend)", "",
        f"- date: {meta['date']}", f"- device: {meta['device']}",
        f"- versions: {meta['versions']}", f"- config: {meta['config']}",
        "- FLOPs: forward 4*B*H*S^2*D (x0.5 causal), backward 2.5x forward; ratio = SDPA "
        "time / Triton time. Triton gradients are fp32, SDPA's bf16.",
        "- copy bandwidth: bytes copied per second of a 2 GiB device copy, i.e. (read + "
        "written) / 2; decode GB/s counts the K+V bytes read once.", "",
        *lines, "", summary, ""]))
    out.with_suffix(".json").write_text(json.dumps(
        {**meta, "attention": rows, "decode": dec, "all_pass": ok}, indent=2) + "\n")
    print("\n".join(lines + ["", summary]), flush=True)
    print(f"wrote {out}, {out.with_suffix('.json')}", flush=True)


def main() -> None:
    a = parse()
    cases, contexts = attention_cases(a), [int(x) for x in a.contexts.split(",")]
    why = None
    if not torch.cuda.is_available():
        why = "CUDA is not available"
    else:
        try:
            import triton  # noqa: F401
        except ImportError:
            why = "triton is not installed"
    if why:
        print(f"{why}: nothing measured, no report written. Would run:")
        for c in cases:
            print(f"  attention fwd+bwd vs SDPA flash, bf16, B=1, S={c['S']}, D={c['D']}, "
                  f"H={c['H']}, causal={c['causal']}")
        for sk in contexts:
            print(f"  decode_partial, bf16, Sk={sk}, {DECODE}, vs copy bandwidth")
        return
    try:
        from tqdm import tqdm
        bar = tqdm(total=1 + len(cases) + len(contexts))
        tick = lambda msg: (bar.set_description(msg), bar.update(1))
    except ImportError:
        bar, tick = None, lambda msg: print(msg, flush=True)
    copy_bw = copy_bandwidth(a)
    tick("copy bandwidth")
    rows = []
    for c in cases:
        rows.append(bench_attention(c, a))
        torch.cuda.empty_cache()
        tick(f"attention S={c['S']} D={c['D']} causal={c['causal']}")
    dec = []
    for sk in contexts:
        dec.append(bench_decode(sk, copy_bw, a))
        torch.cuda.empty_cache()
        tick(f"decode Sk={sk}")
    if bar:
        bar.close()
    report(a, rows, dec, copy_bw)


if __name__ == "__main__":
    main()
