"""CPU ring-attention benchmark: ringmem vs single-process SDPA vs ring-attention-pytorch.

Run: torchrun --standalone --nproc-per-node 2 benchmarks/ring_cpu.py [--seq 8192 ...]
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ringmem

from _common import cpu_model, fwd_bwd, git_commit, grad_leaves, timed

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOL = {"fp32": 1e-3, "bf16": 5e-2, "fp16": 5e-2}
TARGETS = {"E fwd": 0.90, "E fwd+bwd": 0.85, "speed-up fwd": 5.0, "speed-up fwd+bwd": 3.0}
Row = dict[str, Any]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    for flag, typ, default in (("--seq", int, 8192), ("--heads", int, 8), ("--dim", int, 64),
                               ("--batch", int, 1), ("--backend", str, "auto"),
                               ("--repeats", int, 5),
                               ("--out", str, "benchmarks/results/ring_cpu.md")):
        p.add_argument(flag, type=typ, default=default)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--layout", default="zigzag", choices=list(ringmem.LAYOUTS))
    p.add_argument("--no-causal", action="store_true")
    p.add_argument("--skip-peer", action="store_true")
    return p.parse_args()


def make_inputs(a: argparse.Namespace, seq: int) -> tuple[torch.Tensor, ...]:
    """Full q, k, v, dout [B, S, H, D]; drawn in fp32 so every dtype sees the same values."""
    g = torch.Generator().manual_seed(0)
    shape = (a.batch, seq, a.heads, a.dim)
    qkv = [torch.randn(shape, generator=g) for _ in range(3)]
    dout = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    return tuple(t.to(DTYPES[a.dtype]) for t in (*qkv, dout))


def max_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


def bench_ringmem(a: argparse.Namespace, full: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    causal = not a.no_causal
    q, k, v, dout = (ringmem.shard(t, layout=a.layout) for t in full)

    def attn(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor) -> torch.Tensor:
        return ringmem.ring_attention(q_, k_, v_, causal=causal, layout=a.layout,
                                      backend=a.backend)

    res: dict[str, Any] = {}
    with torch.no_grad():
        res["fwd"] = timed(lambda: res.__setitem__("out", attn(q, k, v)), a.repeats)
    leaves = grad_leaves((q, k, v))
    res["fwd+bwd"] = timed(fwd_bwd(attn, leaves, dout), a.repeats)
    # unshard is a collective, so every rank does it even though only rank 0 compares
    res["out"] = ringmem.unshard(res["out"], layout=a.layout)
    res["grads"] = [ringmem.unshard(t.grad, layout=a.layout) for t in leaves]
    return res


def bench_single(a: argparse.Namespace, full: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """Rank 0 alone on both cores; the other rank sleeps in a barrier meanwhile."""
    res: dict[str, Any] = {}
    if dist.get_rank() == 0:
        torch.set_num_threads(2)
        causal = not a.no_causal

        def attn(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(q_, k_, v_, is_causal=causal)

        # SDPA's native [B, H, S, D], contiguous, so no layout change is timed
        q, k, v, dout = (t.transpose(1, 2).contiguous() for t in full)
        with torch.no_grad():
            res["fwd"] = timed(lambda: res.__setitem__("out", attn(q, k, v)), a.repeats,
                               over_ranks=False)
        leaves = grad_leaves((q, k, v))
        res["fwd+bwd"] = timed(fwd_bwd(attn, leaves, dout), a.repeats, over_ranks=False)
        res["out"] = res["out"].transpose(1, 2)  # back to [B, S, H, D] for comparison
        res["grads"] = [t.grad.transpose(1, 2) for t in leaves]
        torch.set_num_threads(1)
    dist.barrier()
    return res


def bench_peer(a: argparse.Namespace,
               full: tuple[torch.Tensor, ...]) -> dict[str, dict[str, Any]] | str:
    """ring-attention-pytorch, contiguous and striped; a string when it is not run."""
    if a.skip_peer:
        return "skipped (--skip-peer)"
    try:
        from ring_attention_pytorch import ring_flash_attn
    except ImportError:
        return "not installed"
    causal, res = not a.no_causal, {}
    for name, layout, striped in (("contiguous", "contiguous", False), ("striped", "stripe", True)):
        def attn(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor,
                 striped: bool = striped) -> torch.Tensor:
            # ring_reduce_col=True is what makes it a ring: the default (False) attends to
            # the local shard only. Its striped mask assumes one bucket per rank (token i on
            # rank i mod P only then), so striped uses bucket_size = S_local. Its ring
            # backward (0.5.20) sums dk and dv together, hence the large fwd+bwd error.
            bucket = q_.shape[1] if striped else 1024
            return ring_flash_attn(q_, k_, v_, causal=causal, bucket_size=bucket,
                                   ring_reduce_col=True, striped_ring_attn=striped)

        r: dict[str, Any] = {}
        try:
            warm_seq = min(1024, a.seq)  # small: first-call costs only
            small = [ringmem.shard(t[:, :warm_seq], layout=layout) for t in full]
            fwd_bwd(attn, grad_leaves(tuple(small[:3])), small[3])()
            sh = [ringmem.shard(t, layout=layout) for t in full]
            r["fwd"] = timed(lambda: r.__setitem__("out", attn(*sh[:3])), 1, warmup=False)
            leaves = grad_leaves(tuple(sh[:3]))
            r["fwd+bwd"] = timed(fwd_bwd(attn, leaves, sh[3]), 1, warmup=False)
            r["out"] = ringmem.unshard(r["out"], layout=layout)
            r["grads"] = [ringmem.unshard(t.grad, layout=layout) for t in leaves]
        except Exception as e:  # raised alike on every rank (dtype/shape), so no hang
            r = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:120]}
        res[name] = r
    return res






def build_rows(ring: dict[str, Any], single: dict[str, Any],
               peer: dict[str, dict[str, Any]] | str) -> list[Row]:
    """Error column: output for fwd rows, max over dq/dk/dv for fwd+bwd rows."""
    def row(name: str, res: dict[str, Any], stage: str) -> Row:
        ref = [single["out"]] if stage == "fwd" else single["grads"]
        got = [res["out"]] if stage == "fwd" else res.get("grads")
        return {"name": f"{name} {stage}", "time_s": statistics.median(res[stage]),
                "min_s": min(res[stage]), "max_s": max(res[stage]),
                "runs": len(res[stage]), "err": None if got is None else max_err(got, ref)}

    rows = [row("ringmem", ring, s) for s in ("fwd", "fwd+bwd")]
    rows += [{"name": f"single-process SDPA {s}", "time_s": statistics.median(single[s]),
              "min_s": min(single[s]), "max_s": max(single[s]),
              "runs": len(single[s]), "err": None} for s in ("fwd", "fwd+bwd")]
    if isinstance(peer, str):
        return rows + [{"name": "ring-attention-pytorch", "note": peer}]
    for stage in ("fwd", "fwd+bwd"):
        cands = []
        for cfg, res in peer.items():
            if "error" in res:
                rows.append({"name": f"ring-attention-pytorch {cfg} {stage}",
                             "note": res["error"]})
                continue
            cands.append(row(f"ring-attention-pytorch {cfg}", res, stage))
        rows += cands
        if cands:
            best = dict(min(cands, key=lambda r: r["time_s"]))
            best["name"] = best["name"].replace("pytorch ", "pytorch (best) ", 1)
            rows.append(best)
    return rows


def derived(rows: list[Row]) -> dict[str, dict[str, Any]]:
    t = {r["name"]: r["time_s"] for r in rows if "time_s" in r}
    out: dict[str, float | None] = {}
    for s in ("fwd", "fwd+bwd"):
        best = next((v for k, v in t.items() if k.startswith("ring-attention-pytorch (best)")
                     and k.endswith(f" {s}")), None)
        out[f"E {s}"] = t[f"single-process SDPA {s}"] / t[f"ringmem {s}"]
        out[f"speed-up {s}"] = None if best is None else best / t[f"ringmem {s}"]
    return {k: {"value": out[k], "target": TARGETS[k],
                "result": "n/a" if v is None else ("PASS" if v >= TARGETS[k] else "FAIL")}
            for k, v in ((k, out[k]) for k in TARGETS)}  # E rows first, then speed-ups


def render(meta: dict[str, Any], rows: list[Row], metrics: dict[str, Any]) -> tuple[str, str]:
    table = ["| run | time s (median) | min-max s over the runs | runs | "
             "max abs err vs single process |", "|---|---|---|---|---|"]
    for r in rows:
        if "note" in r:
            table.append(f"| {r['name']} | {r['note']} | | | |")
        else:
            err = "(reference)" if r["err"] is None else f"{r['err']:.2e}"
            table.append(f"| {r['name']} | {r['time_s']:.4f} | {r['min_s']:.4f}-"
                         f"{r['max_s']:.4f} | {r['runs']} | {err} |")
    table.append("\nerr: fwd rows compare outputs, fwd+bwd rows the max over dq, dk, dv.")
    mlines = ["| metric | value | target | result |", "|---|---|---|---|"]
    for k, m in metrics.items():
        unit = "x" if k.startswith("speed") else ""
        val = "n/a" if m["value"] is None else f"{m['value']:.3f}{unit}"
        mlines.append(f"| {k} | {val} | >= {m['target']}{unit} | {m['result']} |")
    cfg = "\n".join(f"- {k}: {v}" for k, v in meta["config"].items())
    ver = "\n".join(f"- {k}: {v}" for k, v in meta["versions"].items())
    md = (f"# ringmem CPU ring-attention benchmark\n\n- date: {meta['date']}\n"
          f"- machine: {meta['machine']['platform']}, CPU: {meta['machine']['cpu']}, "
          f"cpu_count: {meta['machine']['cpu_count']}\n- load average (1, 5, 15 min) at "
          f"the end: {meta['load_average_end']} (other jobs on the machine skew every "
          f"timing)\n\n## Versions\n\n{ver}\n\n"
          f"## Config\n\n{cfg}\n\n## Results\n\n" + "\n".join(table) +
          "\n\n## Derived\n\nE = T(single, 2 threads) / T(ringmem, 2 ranks x 1 thread); "
          "speed-up = T(ring-attention-pytorch best) / T(ringmem).\n\n" +
          "\n".join(mlines) + f"\n\nCorrectness: {meta['correctness']}\n")
    return "\n".join(table) + "\n\n" + "\n".join(mlines), md


def report(a: argparse.Namespace, ring: dict[str, Any], single: dict[str, Any],
           peer: dict[str, dict[str, Any]] | str) -> bool:
    """Rank 0: print the table, write the .md and .json; True if ringmem's output is wrong."""
    rows = build_rows(ring, single, peer)
    metrics = derived(rows)
    err, tol = rows[0]["err"], TOL[a.dtype]
    bad = [r["name"] for r in rows if (r.get("err") or 0) > tol]
    try:
        peer_version = importlib.metadata.version("ring-attention-pytorch")
    except importlib.metadata.PackageNotFoundError:
        peer_version = "not installed"
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu": cpu_model(),
                    "cpu_count": os.cpu_count()},
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "ringmem": ringmem.__version__, "ring-attention-pytorch": peer_version,
                     "git commit": git_commit()},
        "config": {**vars(a), "causal": not a.no_causal, "world size": dist.get_world_size(),
                   "threads per rank": 1, "single-process threads": 2},
        "correctness": f"ringmem output max abs err {err:.2e} vs tolerance {tol:g}: "
                       f"{'FAIL' if err > tol else 'OK'}; rows above tolerance: "
                       f"{', '.join(bad) or 'none'}",
    }
    table, md = render(meta, rows, metrics)
    print(table + "\n\n" + meta["correctness"], flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    out.with_suffix(".json").write_text(json.dumps(
        {**meta, "rows": rows, "derived": metrics}, indent=2) + "\n")
    print(f"wrote {out} and {out.with_suffix('.json')}", flush=True)
    return err > tol


def main() -> None:
    a = parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    stages = ["ringmem", "single process", "ring-attention-pytorch", "report"]
    bar: Any = None
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(stages)) if rank == 0 else None
    except ImportError:
        pass

    def progress(i: int) -> None:  # called as stage i starts
        if rank == 0 and bar is None:
            print(f"[{i + 1}/{len(stages)}] {stages[i]}", flush=True)
        elif rank == 0:
            bar.set_description(stages[i])
            bar.update(int(i > 0))

    full = make_inputs(a, a.seq)
    progress(0)
    ring = bench_ringmem(a, full)
    progress(1)
    single = bench_single(a, full)
    progress(2)
    peer = bench_peer(a, full)
    progress(3)
    failed = torch.zeros(1)
    if rank == 0:
        if bar is not None:
            bar.update(1)
            bar.close()
        failed[0] = float(report(a, ring, single, peer))
    dist.broadcast(failed, src=0)  # every rank exits with the same status
    dist.destroy_process_group()
    if failed.item():
        sys.exit(1)


if __name__ == "__main__":
    main()
