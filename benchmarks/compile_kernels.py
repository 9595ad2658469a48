"""Offline compilation report of ringmem's Triton kernels for sm_90 (and sm_80), no GPU needed.

Compiles every kernel (forward, backward dK/dV, backward dQ, delta, decode, paged run-list
decode, merge) for each head dim (64, 128, 256) and dtype (fp16, bf16, fp32) and each config
of its autotune set (`ringmem.kernels.configs.TILES`; with --explore also the candidates
below). Forward and backward compile in their causal variant and, as *_band and *_cap on
their variant sets (`configs.VARIANT_TILES`), with both band edges and with both edges and
the softcap. It reports per kernel/config: tile, warps, stages, registers per thread, stack,
spill instructions (local loads/stores in SASS), shared memory, the MMA path (wgmma =
HGMMA in SASS, mma.sync = HMMA, none = FMA) and whether an MMA runs in TF32.

Run: python benchmarks/compile_kernels.py [--explore] [--archs 90,80] [--check]
Writes benchmarks/results/kernels_sm<arch>.md and .json. --check exits 1 when a config of
an autotune set spills, needs more shared memory than the arch allows, runs an fp32 dot in
TF32, or (sm_90, fp16/bf16) misses wgmma.
"""
from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # compile for real: before triton is imported
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402

from ringmem.kernels import configs  # noqa: E402
from ringmem.kernels.configs import Tile  # noqa: E402

from _common import git_commit, machine  # noqa: E402
from _compile import SPECS, compile_one, fixed_tiles  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
T = Tile
_FWD_HALF = {64: [T(128, 64, 4, 3), T(128, 64, 8, 3), T(128, 64, 8, 4), T(128, 128, 8, 3),
                  T(64, 64, 4, 3), T(64, 128, 4, 3), T(64, 128, 8, 3), T(128, 128, 8, 2)],
             128: [T(128, 64, 8, 3), T(128, 64, 8, 2), T(64, 64, 4, 3), T(64, 64, 4, 2),
                   T(128, 128, 8, 2), T(128, 64, 4, 3), T(64, 128, 4, 2), T(64, 128, 8, 2)],
             256: [T(64, 32, 4, 2), T(64, 32, 8, 2), T(64, 32, 8, 3), T(64, 64, 4, 2),
                   T(64, 64, 8, 2), T(128, 32, 8, 2), T(128, 64, 8, 2), T(64, 32, 4, 3)]}
_FWD_FP32 = {64: [T(16, 32, 4, 2), T(32, 32, 4, 2), T(32, 32, 8, 2), T(64, 32, 8, 2),
                  T(16, 64, 4, 2), T(64, 32, 4, 2)],
             128: [T(16, 32, 4, 2), T(32, 32, 8, 2), T(16, 64, 4, 2), T(16, 16, 4, 2),
                   T(32, 32, 4, 2), T(64, 32, 8, 2)],
             256: [T(16, 16, 4, 2), T(16, 32, 4, 2), T(16, 32, 8, 2), T(32, 16, 8, 2),
                   T(32, 32, 8, 2), T(32, 16, 4, 2)]}
_BWD_HALF = {64: [T(64, 64, 4, 2), T(64, 64, 8, 2), T(32, 64, 4, 2), T(64, 32, 4, 2),
                  T(128, 64, 8, 2), T(64, 128, 8, 2), T(32, 128, 8, 2), T(128, 32, 8, 2),
                  T(128, 128, 8, 2)],
             128: [T(64, 64, 8, 2), T(64, 64, 4, 2), T(32, 64, 4, 2), T(64, 32, 4, 2),
                   T(128, 64, 8, 2), T(64, 128, 8, 2), T(32, 128, 8, 2), T(128, 32, 8, 2),
                   T(32, 128, 4, 2)],
             256: [T(32, 32, 4, 2), T(32, 64, 8, 2), T(64, 32, 8, 2), T(64, 64, 8, 2),
                   T(32, 32, 8, 2), T(16, 64, 4, 2), T(64, 16, 4, 2), T(16, 64, 8, 2),
                   T(16, 128, 8, 2)]}
_BWD_FP32 = {64: [T(16, 16, 4, 2), T(16, 32, 4, 2), T(32, 16, 4, 2), T(32, 32, 4, 2),
                  T(32, 32, 8, 2), T(16, 16, 8, 2)],
             128: [T(16, 16, 4, 2), T(16, 32, 4, 2), T(32, 16, 4, 2), T(32, 32, 4, 2),
                   T(32, 32, 8, 2), T(16, 16, 8, 2)],
             256: [T(16, 16, 4, 2), T(16, 32, 8, 2), T(32, 16, 8, 2), T(16, 16, 8, 2),
                   T(16, 32, 4, 2), T(32, 16, 4, 2)]}
# what --explore compiles besides the sets (the sets were picked from these)
CANDIDATES = {"fwd": (_FWD_HALF, _FWD_FP32), "dkdv": (_BWD_HALF, _BWD_FP32),
              "dq": (_BWD_HALF, _BWD_FP32)}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default="90,80")
    p.add_argument("--dims", default="64,128,256")
    p.add_argument("--dtypes", default="fp16,bf16,fp32")
    p.add_argument("--kernels", default=",".join(SPECS))
    p.add_argument("--explore", action="store_true", help="also compile the candidates")
    p.add_argument("--check", action="store_true", help="exit 1 if a set config is unfit")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--json-only", action="store_true", help="write only the .json files")
    a = p.parse_args()
    for name in a.kernels.split(","):
        if name not in SPECS:
            p.error(f"--kernels: unknown kernel {name!r} (one of {', '.join(SPECS)})")
    for name in a.dtypes.split(","):
        if name not in DTYPES:
            p.error(f"--dtypes: unknown dtype {name!r} (one of {', '.join(DTYPES)})")
    return a


def jobs(a: argparse.Namespace, arch: int) -> list[tuple[str, int, str, Tile, bool]]:
    """(kernel, head dim, dtype, tile, in its autotune set) to compile for `arch`."""
    out = []
    for kernel in a.kernels.split(","):
        for d in map(int, a.dims.split(",")):
            dts = a.dtypes.split(",") if kernel != "merge" else ["fp32"]  # fp32 partials
            for dt in dts:
                if not SPECS[kernel].tuned:
                    out += [(kernel, d, dt, t, True) for t in fixed_tiles(kernel, d, DTYPES[dt])]
                    continue
                spec = SPECS[kernel]
                chosen = configs.tiles_for(spec.set_name, arch, d, DTYPES[dt], spec.variant)
                out += [(kernel, d, dt, t, True) for t in chosen]
                if a.explore:
                    cands = CANDIDATES[spec.set_name][dt == "fp32"][d]
                    out += [(kernel, d, dt, t, False) for t in cands if t not in chosen]
    return out


def problems(r: dict[str, Any], arch: int) -> list[str]:
    """Why a compiled config may not be in an autotune set for `arch`."""
    why = []
    if r.get("error"):
        return ["compile error"]
    if r["spills"]:
        why.append("spills")
    if not r["smem_ok"]:
        why.append(f"smem > {configs.SMEM_LIMIT[arch] // 1024} KB")
    if r["dtype"] == "fp32" and r["tf32"]:
        why.append("tf32")
    spec = SPECS[r["kernel"]]
    tile = Tile(r["block_m"], r["block_n"], r["num_warps"], r["num_stages"])
    # a variant's substitute for an emptied set may lack wgmma (none is spill-free there)
    substitute = spec.variant != "base" and tile not in configs.tiles_for(
        spec.set_name, arch, r["D"], DTYPES[r["dtype"]])
    if arch == 90 and r["dtype"] != "fp32" and spec.tuned and not substitute \
            and r["mma"] != "wgmma":
        why.append("no wgmma")
    return why


def run_arch(a: argparse.Namespace, arch: int) -> list[dict[str, Any]]:
    rows = []
    todo = jobs(a, arch)
    for i, (kernel, d, dt, tile, in_set) in enumerate(todo):
        t0 = time.time()
        row = {"arch": arch, "kernel": kernel, "D": d, "dtype": dt,
               "block_m": tile.block_m, "block_n": tile.block_n, "num_warps": tile.num_warps,
               "num_stages": tile.num_stages, "in_set": in_set}
        try:
            row.update(compile_one(SPECS[kernel], arch, d, DTYPES[dt], tile))
        except Exception as e:  # noqa: BLE001 -- reported, never hidden
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        row["problems"] = problems(row, arch)
        row["compile_s"] = round(time.time() - t0, 2)
        rows.append(row)
        print(f"[sm_{arch} {i + 1}/{len(todo)}] {kernel} D={d} {dt} {tile}: "
              f"{row.get('regs')} regs, {row.get('smem')} B smem, {row.get('mma')}, "
              f"{'in set' if in_set else 'candidate'} {row['problems'] or 'ok'}", flush=True)
    return rows


def tile_name(r: dict[str, Any]) -> str:
    if r["kernel"] in ("delta", "merge"):
        return f"{r['block_m']} rows"
    return f"{r['block_m']}x{r['block_n']}"


def markdown(arch: int, rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    yes = lambda x: "yes" if x else "no"
    lines = [f"# Triton kernels compiled offline for sm_{arch}", "",
             *(f"- {k}: {v}" for k, v in meta.items()), "",
             "Registers per thread and stack from `cuobjdump -res-usage`; spills = local-memory "
             "loads/stores (LDL/STL) in the SASS; shared memory = what the launch requests "
             f"(limit {configs.SMEM_LIMIT[arch]} B per block); MMA: wgmma = HGMMA in the SASS, "
             "mma.sync = HMMA, none = FMA (fp32 dots are IEEE, `input_precision=\"ieee\"`); "
             "tf32 = an MMA instruction of the PTX names tf32. fwd/dkdv/dq: causal variants; "
             "*_band: both band edges; *_cap: both edges and the softcap (their own sets, "
             "`VARIANT_TILES`); decode/runs at their 16-row tile and their largest BLOCK_M "
             "(64 query heads per KV head). `set` = in the kernel's autotune set for this "
             "arch (fixed-config kernels: always); rows not in a set are the candidates the "
             "sets were picked from, with what rules them out.", "",
             "| kernel | D | dtype | tile | warps | stages | regs | stack | spills | smem KB "
             "| MMA | wgmma | tf32 | set | problems |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['kernel']} | {r['D']} | {r['dtype']} | {tile_name(r)} | "
                         f"{r['num_warps']} | {r['num_stages']} | | | | | | | | "
                         f"{yes(r['in_set'])} | {r['error']} |")
            continue
        lines.append(
            f"| {r['kernel']} | {r['D']} | {r['dtype']} | {tile_name(r)} | {r['num_warps']} | "
            f"{r['num_stages']} | {r['regs']} | {r['stack']} | {r['spill_insts']} | "
            f"{r['smem'] / 1024:.1f} | {r['mma']} | {yes(r['mma'] == 'wgmma')} | "
            f"{yes(r['tf32'])} | {yes(r['in_set'])} | {', '.join(r['problems']) or '-'} |")
    bad = [r for r in rows if r["in_set"] and r["problems"]]
    lines += ["", f"Configs in a set with problems: {len(bad)} of "
              f"{sum(r['in_set'] for r in rows)}.", ""]
    return "\n".join(lines)


def main() -> int:
    a = parse()
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), "commit": git_commit(),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "triton": triton.__version__},
            "target": "triton.compile(ASTSource(...), target=GPUTarget('cuda', arch, 32))",
            "options": {"TRITON_DEFAULT_FP_FUSION": os.environ["TRITON_DEFAULT_FP_FUSION"]}}
    out_dir, failed = Path(a.out_dir), 0
    out_dir.mkdir(parents=True, exist_ok=True)
    for arch in map(int, a.archs.split(",")):
        if arch not in configs.ARCHS:
            print(f"--archs: {arch} is not one of {configs.ARCHS}", file=sys.stderr)
            return 2
        rows = run_arch(a, arch)
        path = out_dir / f"kernels_sm{arch}"
        path.with_suffix(".json").write_text(json.dumps({**meta, "arch": arch, "rows": rows},
                                                        indent=1) + "\n")
        if not a.json_only:
            path.with_suffix(".md").write_text(markdown(arch, rows, meta))
        failed += sum(1 for r in rows if r["in_set"] and r["problems"])
        print(f"wrote {path}.json" + ("" if a.json_only else f", {path}.md"), flush=True)
    if a.check and failed:
        print(f"{failed} config(s) of the autotune sets have problems", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
