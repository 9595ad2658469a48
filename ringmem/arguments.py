"""Shared rules for public arguments: boolean flags, positive finite numbers."""
from __future__ import annotations

import math

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""The dtypes attention and the KV cache take (accumulated in fp32, fp64 for fp64)."""


def flag_error(name: str, value: object) -> TypeError | None:
    """A TypeError naming `name` and `value` unless value is a real bool. Truthiness is not
    enough: "no", 0.5 or a one-element tensor would silently mean True (or a host sync), and
    numpy bools are refused too (pass bool(x))."""
    if isinstance(value, bool):
        return None
    return TypeError(f"{name} must be a bool, got {value!r} (a {type(value).__name__}: pass "
                     f"True or False)")


def check_flag(name: str, value: object) -> bool:
    """`value` if it is a bool, else raise `flag_error`'s TypeError."""
    error = flag_error(name, value)
    if error is not None:
        raise error
    return value  # type: ignore[return-value]


def positive_number(name: str, value: int | float, tiny: float = 0.0) -> float:
    """`value` (an int or float) as a float that is finite and > 0 (>= `tiny` when given),
    else a ValueError naming `name` and the value. An int too large for a float is such an
    error too (float() would raise a bare OverflowError naming nothing)."""
    bound = f" (>= {tiny:.3g})" if tiny else ""
    shown = repr(value)
    if len(shown) > 40:  # 10**400: a 401-digit message helps nobody
        shown = f"{shown[:20]}... ({len(shown)} digits)"
    try:
        x = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be a positive finite number{bound}, got {shown} "
                         f"(too large for a float)") from None
    if not math.isfinite(x) or x <= 0 or x < tiny:
        raise ValueError(f"{name} must be a positive finite number{bound}, got {shown}")
    return x


def dtype_error(name: str, dtype: torch.dtype) -> TypeError | None:
    """A TypeError naming `name`'s dtype and the supported ones, unless it is one of
    `DTYPES` (float8 and complex have no attention kernels and no exact lse merge here)."""
    if dtype in DTYPES:
        return None
    return TypeError(f"{name} has dtype {dtype}, which ringmem does not support: use one of "
                     f"{', '.join(str(d) for d in DTYPES)}")
