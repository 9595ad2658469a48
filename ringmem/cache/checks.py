"""Argument checks of the cache's entry points: each raises ValueError/TypeError naming the
argument and its value (callers collect the error and raise it on every rank)."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..arguments import positive_number

if TYPE_CHECKING:
    from .config import CacheConfig


def check_index(name: str, value: object, bound: int) -> int:
    """`layer` or `seq`: an int in [0, bound)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < bound:
        raise ValueError(f"{name} must be an int in [0, {bound}), got {value!r}")
    return value


def check_tensor(name: str, x: object, c: CacheConfig, heads: int,
                 length: int | None = None) -> None:
    """x must be [B, S, heads, head_dim] in the cache's dtype, on its device type."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != c.dtype:
        raise ValueError(f"{name}.dtype is {x.dtype}, the cache holds {c.dtype}")
    if x.device.type != torch.device(c.device).type:
        raise ValueError(f"{name} is on {x.device}, the cache is on {c.device}")
    if x.dim() != 4 or x.shape[2] != heads or x.shape[3] != c.head_dim:
        raise ValueError(f"{name} must be [B, S, {heads}, {c.head_dim}] for this cache, got "
                         f"{tuple(x.shape)}")
    if length is not None and x.shape[1] != length:
        raise ValueError(f"{name}.shape[1] must be {length}, got {x.shape[1]}")


def check_finite(what: str, k: Tensor, v: Tensor, where: Tensor | None = None) -> None:
    """ValueError naming k or v (and the first bad token) if either holds NaN or inf: a
    cached non-finite key or value would make every later query that sees it NaN. One
    host read in the common case. k, v [B, S, Hkv, D]; `where` [S]: the tokens' global
    positions (prefill), else the first bad (sequence, token) is named (decode)."""
    if bool(torch.isfinite(k).all() & torch.isfinite(v).all()):
        return
    for name, t in (("k", k), ("v", v)):
        bad = (~torch.isfinite(t)).flatten(2).any(-1).nonzero()  # [n, 2]: (row, token)
        if len(bad):
            row, tok = (int(x) for x in bad[0])
            at = f"position {int(where[tok])}" if where is not None else f"sequence {row}"
            raise ValueError(f"{what}: {name} holds NaN or inf at {len(bad)} token(s) "
                             f"(first at {at}); non-finite keys/values are never cached "
                             f"(they would make every later step NaN): nothing was stored")


def check_scale(softmax_scale: object, head_dim: int) -> float:
    """The softmax scale: 1 / sqrt(head_dim) by default, else a positive finite number."""
    if softmax_scale is None:
        return 1 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise ValueError(f"softmax_scale must be a positive finite number, got "
                         f"{softmax_scale!r}")
    return positive_number("softmax_scale", softmax_scale)
