"""Offline compilation of ringmem's Triton kernels for a GPU arch, without a GPU.

`compile_one(spec, arch, d, dtype, tile)` builds the kernel with `triton.compile` for
`GPUTarget("cuda", arch, 32)` and reads the facts back from its PTX and cubin with the
`cuobjdump` that ships with Triton: registers, stack, spills (local-memory loads/stores in
SASS), shared memory, the MMA instructions (HGMMA = wgmma, HMMA = mma.sync, none = FMA)
and whether any MMA runs in TF32. TRITON_INTERPRET must be unset before triton is imported.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ringmem.kernels import attention, backward, configs, decode, merge
from ringmem.kernels.configs import Tile

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
TY = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
CONSTEXPRS = {"HAS_LO", "HAS_HI", "SOFTCAP", "BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_R",
              "PREC"}
FLOATS = {"qk_scale", "scale", "cap"}


@dataclass(frozen=True)
class Spec:
    """A kernel to compile: its jit function, the element type of each pointer argument
    ("in" = the input dtype), and its constexprs for (head dim, dtype, tile)."""
    name: str
    fn: Any
    ptrs: dict[str, str]
    meta: Callable[[int, torch.dtype, Tile], dict[str, Any]]
    tuned: bool  # whether `configs.TILES[tiles or name]` holds its autotune set
    tiles: str | None = None  # the TILES entry when not `name` (a variant of a kernel)
    variant: str = "base"  # its set in `configs.VARIANT_TILES` ("band", "cap")

    @property
    def set_name(self) -> str:
        return self.tiles or self.name


def _attn_meta(d: int, dtype: torch.dtype, t: Tile) -> dict[str, Any]:
    """The causal variant (upper band edge only), what every plain ring step runs."""
    return {"HAS_LO": False, "HAS_HI": True, "SOFTCAP": False, "BLOCK_M": t.block_m,
            "BLOCK_N": t.block_n, "BLOCK_D": configs.block_d(d),
            "PREC": configs.dot_precision(dtype)}


def _band_meta(d: int, dtype: torch.dtype, t: Tile) -> dict[str, Any]:
    """The "band" variant at its largest: both edges (a sliding-window piece)."""
    return dict(_attn_meta(d, dtype, t), HAS_LO=True)


def _cap_meta(d: int, dtype: torch.dtype, t: Tile) -> dict[str, Any]:
    """The "cap" variant at its largest: both band edges and the softcap."""
    return dict(_band_meta(d, dtype, t), SOFTCAP=True)


def _decode_meta(d: int, dtype: torch.dtype, t: Tile) -> dict[str, Any]:
    return dict(_attn_meta(d, dtype, t), HAS_HI=False)


def _runs_meta(d: int, dtype: torch.dtype, t: Tile) -> dict[str, Any]:
    m = _decode_meta(d, dtype, t)
    for flag in ("HAS_LO", "HAS_HI", "SOFTCAP"):
        del m[flag]
    return m


QKV = {"Q": "in", "K": "in", "V": "in"}
GRAD_IN = {**QKV, "DO": "in", "LSE": "fp32", "DELTA": "fp32"}
SPECS = {
    "fwd": Spec("fwd", attention._fwd_kernel, {**QKV, "O": "in", "LSE": "fp32"},
                _attn_meta, True),
    "dkdv": Spec("dkdv", backward._bwd_dkdv_kernel, {**GRAD_IN, "DK": "fp32", "DV": "fp32"},
                 _attn_meta, True),
    "dq": Spec("dq", backward._bwd_dq_kernel, {**GRAD_IN, "DQ": "fp32"}, _attn_meta, True),
    # the larger variants, on their own sets (`configs.VARIANT_TILES`)
    **{f"{k}_{var}": Spec(f"{k}_{var}", fn, ptrs, meta, True, k, var)
       for k, fn, ptrs in (("fwd", attention._fwd_kernel, {**QKV, "O": "in", "LSE": "fp32"}),
                           ("dkdv", backward._bwd_dkdv_kernel,
                            {**GRAD_IN, "DK": "fp32", "DV": "fp32"}),
                           ("dq", backward._bwd_dq_kernel, {**GRAD_IN, "DQ": "fp32"}))
       for var, meta in (("band", _band_meta), ("cap", _cap_meta))},
    "delta": Spec("delta", backward._bwd_delta_kernel,
                  {"O": "in", "DO": "in", "DELTA": "fp32"},
                  lambda d, dt, t: {"BLOCK_M": t.block_m, "BLOCK_D": configs.block_d(d)},
                  False),
    "decode": Spec("decode", attention._fwd_kernel, {**QKV, "O": "fp32", "LSE": "fp32"},
                   _decode_meta, False),
    "runs": Spec("runs", decode._runs_kernel,
                 {**QKV, "RANGES": "i64", "STARTS": "i64", "O": "fp32", "LSE": "fp32"},
                 _runs_meta, False),
    "merge": Spec("merge", merge._merge_kernel,
                  {"OUTS": "fp32", "LSES": "fp32", "O": "fp32", "L": "fp32"},
                  lambda d, dt, t: {"BLOCK_R": t.block_m, "BLOCK_D": configs.block_d(d)},
                  False),
}


def fixed_tiles(kernel: str, d: int, dtype: torch.dtype) -> list[Tile]:
    """The one launch configuration of a kernel that is not autotuned (Triton's default
    warps/stages where the launcher sets none)."""
    bd = configs.block_d(d)
    if kernel == "delta":
        return [Tile(backward.DELTA_BLOCK_M, 0, 4, 3)]
    if kernel == "merge":
        return [Tile(configs.MERGE_BLOCK_R, 0, 4, 3)]
    # decode / runs: the 16-row tile (GQA groups up to 16) and the largest (64 rows)
    return list(dict.fromkeys(configs.decode_tile(bd, r, dtype) for r in (4, 64)))


def _signature(spec: Spec, dtype: torch.dtype, meta: dict[str, Any]) -> dict[str, str]:
    sig = {}
    for name in spec.fn.arg_names:
        if name in meta or name in CONSTEXPRS:
            sig[name] = "constexpr"
        elif name in spec.ptrs:
            role = spec.ptrs[name]
            sig[name] = "*" + (TY[dtype] if role == "in" else role)
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
    return sig


def _attrs(spec: Spec, sig: dict[str, str]) -> dict[tuple[int], list]:
    """What a real launch specializes: 16-byte aligned pointers, strides and head dim
    divisible by 16 (as for D = 64/128/256 with contiguous last dims)."""
    out = {}
    for i, name in enumerate(spec.fn.arg_names):
        if sig[name].startswith("*") or (sig[name] == "i32" and (name[0] == "s" or name == "D")):
            out[(i,)] = [["tt.divisibility", 16]]
    return out


def _tool(name: str, *args: str) -> str:
    return subprocess.run([str(BIN / name), *args], capture_output=True, text=True,
                          check=True).stdout


def analyse(ptx: str, cubin: bytes, shared: int) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = _tool("cuobjdump", "-res-usage", f.name)
        sass = _tool("cuobjdump", "--dump-sass", f.name)
    num = lambda key: int(m.group(1)) if (m := re.search(rf"{key}:(\d+)", res)) else -1
    mma_lines = [ln for ln in ptx.splitlines() if "mma" in ln and not ln.lstrip().startswith("//")]
    if "HGMMA" in sass:
        mma = "wgmma"
    elif "HMMA" in sass:
        mma = "mma.sync"
    else:
        mma = "none (FMA)"
    return {"regs": num("REG"), "stack": num("STACK"),
            "spill_insts": len(re.findall(r"\b(?:STL|LDL)(?:\.\w+)*\b", sass)),
            "smem": shared, "mma": mma, "tf32": any("tf32" in ln for ln in mma_lines)}


def compile_one(spec: Spec, arch: int, d: int, dtype: torch.dtype,
                tile: Tile) -> dict[str, Any]:
    meta = spec.meta(d, dtype, tile)
    sig = _signature(spec, dtype, meta)
    src = ASTSource(spec.fn, sig, meta, _attrs(spec, sig))
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": tile.num_warps, "num_stages": tile.num_stages})
    facts = analyse(k.asm["ptx"], k.asm["cubin"], k.metadata.shared)
    facts["spills"] = facts["spill_insts"] > 0
    facts["smem_ok"] = facts["smem"] <= configs.SMEM_LIMIT[arch]
    return facts
