"""Tile configurations of the Triton kernels and the helpers every kernel file shares.

`TILES[kernel][(arch, head-dim class, dtype class)]` is the autotune set of one kernel
("fwd", "dkdv", "dq") on one GPU generation (80: Ampere and everything that is not Hopper,
90: Hopper), for head dims up to 64 / 128 / 256 and for half precision (fp16, bf16) or fp32.
Every entry was compiled offline for its arch by `benchmarks/compile_kernels.py`
(results in `benchmarks/results/kernels_sm90.md`): none spills registers, none needs more
shared memory than the arch gives a block, and on sm_90 the half-precision ones use wgmma.
Decode uses fixed tiles (`DECODE_TILES`) so that its key splits are whole tiles known on the
host before launch.

Under the Triton interpreter (CPU) nothing is autotuned: the first tile of the sm_90 set is
used, and the tests run every tile of every set explicitly.

The constexpr flags HAS_LO / HAS_HI / SOFTCAP (`band.py`) select the compiled variant of
the attention kernels, so they are part of every autotune key (`TUNE_KEY`); a lower band
edge or the softcap adds code, and where that makes tiles spill the variant has its own set
(`VARIANT_TILES`, chosen by `variant`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import triton
from torch import Tensor

LOG2E = 1.4426950408889634
HEAD_DIM_CLASSES = (64, 128, 256)
ARCHS = (80, 90)
# what an autotuned launch is keyed on: the compiled variant (head dim, band edges, softcap);
# Triton adds the tensors' dtypes itself
TUNE_KEY = ["BLOCK_D", "HAS_LO", "HAS_HI", "SOFTCAP"]
# largest shared memory one block may use (bytes): 227 KB on sm_90, 163 KB on sm_80
SMEM_LIMIT = {90: 232448, 80: 166912}


@dataclass(frozen=True)
class Tile:
    """One launch configuration: a BLOCK_M x BLOCK_N tile, warps and pipeline stages."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def meta(self) -> dict[str, int]:
        """Keyword arguments of a direct (not autotuned) launch."""
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n,
                "num_warps": self.num_warps, "num_stages": self.num_stages}

    def config(self) -> triton.Config:
        return triton.Config({"BLOCK_M": self.block_m, "BLOCK_N": self.block_n},
                             num_warps=self.num_warps, num_stages=self.num_stages)

    def __str__(self) -> str:
        return f"{self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages}"


T = Tile
# Picked from the offline compile report (see the module docstring), per kernel and
# (arch, head-dim class, "half" | "fp32"): spill-free, within shared memory, wgmma on sm_90
# for half; a large and a smaller tile each, the autotuner choosing at run time. fp32 dots
# run in IEEE precision on FMA units (no tensor cores), hence the small fp32 tiles. At
# D = 256 only one half tile of dK/dV and of dQ is spill-free with wgmma on sm_90.
TILES: dict[str, dict[tuple[int, int, str], tuple[Tile, ...]]] = {
    "fwd": {
        (90, 64, "half"): (T(128, 64, 8, 3), T(64, 64, 4, 3), T(64, 128, 8, 3)),
        (90, 128, "half"): (T(128, 64, 8, 3), T(128, 64, 8, 2), T(64, 64, 4, 3)),
        (90, 256, "half"): (T(64, 32, 8, 2), T(64, 32, 8, 3)),
        (80, 64, "half"): (T(128, 64, 8, 3), T(128, 128, 8, 3), T(64, 64, 4, 3)),
        (80, 128, "half"): (T(128, 64, 8, 3), T(64, 128, 8, 2)),
        (80, 256, "half"): (T(64, 32, 8, 2), T(64, 32, 8, 3)),
        (90, 64, "fp32"): (T(32, 32, 8, 2), T(64, 32, 8, 2), T(16, 64, 4, 2)),
        (90, 128, "fp32"): (T(32, 32, 8, 2), T(16, 32, 4, 2), T(16, 64, 4, 2)),
        (90, 256, "fp32"): (T(16, 32, 8, 2), T(32, 16, 8, 2)),
        (80, 64, "fp32"): (T(32, 32, 8, 2), T(64, 32, 8, 2)),
        (80, 128, "fp32"): (T(32, 32, 8, 2), T(16, 32, 4, 2)),
        (80, 256, "fp32"): (T(16, 32, 8, 2), T(32, 16, 8, 2)),
    },
    "dkdv": {  # BLOCK_N keys per program, BLOCK_M query rows per step
        (90, 64, "half"): (T(64, 64, 8, 2), T(32, 128, 8, 2), T(128, 64, 8, 2)),
        (90, 128, "half"): (T(64, 64, 8, 2), T(32, 128, 8, 2), T(64, 128, 8, 2)),
        (90, 256, "half"): (T(16, 64, 8, 2),),
        (80, 64, "half"): (T(64, 64, 8, 2), T(32, 128, 8, 2), T(128, 32, 8, 2)),
        (80, 128, "half"): (T(64, 64, 8, 2), T(128, 32, 8, 2), T(32, 64, 4, 2)),
        (80, 256, "half"): (T(32, 32, 8, 2), T(64, 32, 8, 2)),
        (90, 64, "fp32"): (T(32, 32, 8, 2), T(16, 32, 4, 2)),
        (90, 128, "fp32"): (T(32, 32, 8, 2), T(16, 16, 8, 2)),
        (90, 256, "fp32"): (T(16, 32, 8, 2), T(16, 16, 8, 2)),
        (80, 64, "fp32"): (T(32, 32, 8, 2), T(16, 32, 4, 2)),
        (80, 128, "fp32"): (T(32, 32, 8, 2), T(16, 16, 8, 2)),
        (80, 256, "fp32"): (T(16, 32, 8, 2), T(16, 16, 8, 2)),
    },
    "dq": {  # BLOCK_M query rows per program, BLOCK_N keys per step
        (90, 64, "half"): (T(64, 64, 4, 2), T(128, 64, 8, 2), T(128, 128, 8, 2)),
        (90, 128, "half"): (T(64, 64, 8, 2), T(128, 64, 8, 2), T(128, 32, 8, 2)),
        (90, 256, "half"): (T(64, 32, 8, 2),),
        (80, 64, "half"): (T(64, 64, 4, 2), T(128, 64, 8, 2), T(128, 32, 8, 2)),
        (80, 128, "half"): (T(64, 64, 8, 2), T(128, 32, 8, 2), T(64, 128, 8, 2)),
        (80, 256, "half"): (T(64, 32, 8, 2), T(32, 32, 8, 2)),
        (90, 64, "fp32"): (T(32, 32, 8, 2), T(32, 32, 4, 2)),
        (90, 128, "fp32"): (T(32, 32, 8, 2), T(16, 32, 4, 2)),
        (90, 256, "fp32"): (T(32, 16, 8, 2), T(16, 32, 8, 2)),
        (80, 64, "fp32"): (T(32, 32, 4, 2), T(16, 32, 4, 2)),
        (80, 128, "fp32"): (T(32, 32, 8, 2), T(16, 32, 4, 2)),
        (80, 256, "fp32"): (T(32, 16, 8, 2), T(16, 32, 8, 2)),
    },
}
# The larger variants of the attention kernels (`variant`): a lower band edge ("band",
# sliding-window pieces) or the softcap ("cap") adds code that makes some tiles of the base
# set spill. Where a set differs, its variant set is given here: the base set without those
# tiles, or (dK/dV with the softcap at D = 256 on sm_90, where no wgmma tile is spill-free)
# a substitute. Measured offline (`benchmarks/compile_kernels.py`, the *_band / *_cap
# kernels) with both band edges, the lower edge alone, and the softcap with two, one or no
# edges; every other set is shared.
VARIANT_TILES: dict[tuple[str, str], dict[tuple[int, int, str], tuple[Tile, ...]]] = {
    ("fwd", "band"): {(90, 128, "fp32"): (T(16, 64, 4, 2),),
                      (80, 128, "half"): (T(64, 128, 8, 2),),
                      (80, 128, "fp32"): (T(16, 32, 4, 2),)},
    ("fwd", "cap"): {(80, 128, "half"): (T(64, 128, 8, 2),),
                     (80, 128, "fp32"): (T(16, 32, 4, 2),),
                     (80, 256, "fp32"): (T(16, 32, 8, 2),)},
    ("dkdv", "band"): {(90, 128, "half"): (T(64, 64, 8, 2), T(32, 128, 8, 2))},
    ("dkdv", "cap"): {(90, 64, "half"): (T(64, 64, 8, 2), T(32, 128, 8, 2)),
                      (90, 128, "half"): (T(32, 128, 8, 2),),
                      (90, 256, "half"): (T(32, 32, 8, 2),),
                      (80, 128, "half"): (T(64, 64, 8, 2), T(128, 32, 8, 2))},
}
VARIANTS = ("base", "band", "cap")
# Decode: a fixed BLOCK_N per (head-dim class, dtype class), so that the host cuts key
# splits into whole tiles; BLOCK_M covers the packed query rows at launch, from 16 up to
# the cap (larger tiles of these shapes spill).
DECODE_TILES: dict[tuple[int, str], tuple[Tile, int]] = {
    (64, "half"): (T(16, 64, 4, 3), 64), (128, "half"): (T(16, 64, 4, 3), 64),
    (256, "half"): (T(16, 32, 4, 2), 32),
    (64, "fp32"): (T(16, 64, 4, 3), 16), (128, "fp32"): (T(16, 32, 4, 2), 16),
    (256, "fp32"): (T(16, 16, 4, 2), 16)}
# rows x head dim of one merge program (a plain streaming kernel, no dots)
MERGE_BLOCK_R = 32


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def block_d(d: int) -> int:
    """The padded head dim of a tile (tl.dot needs at least 16)."""
    return max(16, triton.next_power_of_2(d))


def head_dim_class(bd: int) -> int:
    for c in HEAD_DIM_CLASSES:
        if bd <= c:
            return c
    raise ValueError(f"head_dim must be <= {HEAD_DIM_CLASSES[-1]}, got padded {bd}")


def dtype_class(dtype: torch.dtype) -> str:
    if dtype in (torch.float16, torch.bfloat16):
        return "half"
    if dtype == torch.float32:
        return "fp32"
    raise TypeError(f"the Triton kernels take float16/bfloat16/float32, got {dtype}")


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 inputs stay IEEE fp32 (Triton's default would be TF32,
    errors near 1e-3); for fp16/bf16 the setting has no effect and stays the default."""
    return "ieee" if dtype == torch.float32 else "tf32"


def arch_of(device: torch.device) -> int:
    """90 for Hopper, else 80 (the Ampere set; a config that does not fit a smaller part is
    skipped by the autotuner, which scores OutOfResources as infinitely slow)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9:
        return 90
    return 80


def variant(has_lo: bool, softcap: bool) -> str:
    """The tile-set variant of a launch: "cap" (softcap), "band" (a lower edge) or "base"
    (full, causal: an upper edge only)."""
    return "cap" if softcap else "band" if has_lo else "base"


def tiles_for(kernel: str, arch: int, bd: int, dtype: torch.dtype,
              var: str = "base") -> tuple[Tile, ...]:
    key = (arch, head_dim_class(bd), dtype_class(dtype))
    return VARIANT_TILES.get((kernel, var), {}).get(key, TILES[kernel][key])


def default_tile(kernel: str, bd: int, dtype: torch.dtype, var: str = "base") -> Tile:
    """The deterministic choice where nothing is autotuned (the interpreter)."""
    return tiles_for(kernel, 90, bd, dtype, var)[0]


def decode_tile(bd: int, rows: int, dtype: torch.dtype) -> Tile:
    """Decode's tile: BLOCK_N fixed, BLOCK_M covering the packed query rows (>= 16)."""
    t, cap = DECODE_TILES[(head_dim_class(bd), dtype_class(dtype))]
    return Tile(min(cap, max(t.block_m, triton.next_power_of_2(rows))), t.block_n,
                t.num_warps, t.num_stages)


def autotune_configs(kernel: str) -> list[triton.Config]:
    """Every distinct tile of a kernel's sets (variants too); `prune_for` narrows them per
    launch."""
    sets = [*TILES[kernel].values(),
            *(v for (k, _), d in VARIANT_TILES.items() if k == kernel for v in d.values())]
    seen = dict.fromkeys(t for tiles in sets for t in tiles)
    return [t.config() for t in seen]


def prune_for(kernel: str, lead: str) -> Callable[..., list[triton.Config]]:
    """An `early_config_prune` keeping the configs of the launch's (arch, BLOCK_D, dtype,
    variant); `lead` names the tensor argument whose device and dtype decide."""
    def prune(configs: list[triton.Config], named_args: dict[str, Any],
              **kwargs: Any) -> list[triton.Config]:
        x: Tensor = named_args[lead]
        var = variant(kwargs.get("HAS_LO", False), kwargs.get("SOFTCAP", False))
        allowed = set(tiles_for(kernel, arch_of(x.device), kwargs["BLOCK_D"], x.dtype, var))
        keep = [c for c in configs
                if Tile(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                        c.num_stages) in allowed]
        return keep or configs[:1]
    return prune


def unit_last(x: Tensor) -> Tensor:
    """The kernels address the head dim with unit stride."""
    return x if x.stride(-1) == 1 else x.contiguous()


def check_index_range(name: str, n: int) -> None:
    """Row and key indices stay int32 inside a tile (only offsets are widened to int64)."""
    if n >= 2**31:
        raise ValueError(f"{name} must be < 2**31, got {n}")


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    """[B, S, H, D] q, k, v with matching batch, head dim, dtype and a GQA head ratio."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name} must be [B, S, H, D], got shape {tuple(x.shape)}")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k/v {tuple(k.shape)}/{tuple(v.shape)} do not match q "
                         f"{tuple(q.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"q heads ({q.shape[2]}) must be a multiple of k heads "
                         f"({k.shape[2]})")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
