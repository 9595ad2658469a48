"""flash-attn 2.x (`flash_attn.flash_attn_interface`) as a block backend.

Every flash-attn version difference lives in this file. The private ops it calls changed shape
across 2.x releases (checked against the tags of Dao-AILab/flash-attention):

`_flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, <tail>)` by release:

    2.0.0 - 2.0.1  return_softmax                                    -> 7 values
    2.0.2 - 2.2.x  return_softmax                                    -> 8 values
    2.3.x          window_size, return_softmax                       -> 8 values
    2.4.x - 2.5.x  window_size, alibi_slopes, return_softmax         -> 8 values
    2.6.x          window_size, softcap, alibi_slopes, return_softmax -> 8 values
    2.7.0 - 2.8.x  window_size_left, window_size_right, softcap, alibi_slopes,
                   return_softmax                                    -> 4 values

7/8 values: (out, q, k, v, out_padded, softmax_lse, S_dmask[, rng_state]);
4 values: (out, softmax_lse, S_dmask, rng_state).

`_flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale,
causal, ...)` gained the same window/softcap/alibi parameters plus `deterministic` (2.4.1) and
`rng_state` (2.0.2); it fills the preallocated dq, dk, dv in every version. So both calls are
built by parameter name from the installed function's signature, and the forward's result is
read by its length. From 2.7 on, with torch 2.4 - 2.9, the ops are `torch.library.custom_op`
objects whose own signature reads `(*args, **kwargs)`: the names come from the decorated
function (or the op schema) instead. (flash-attn tests `torch.__version__ >= "2.4.0"` as
strings, so with torch 2.10+ the same ops are plain functions again.)

Layout is native: q [B, S, Hq, D], k/v [B, S, Hkv, D] with Hq a multiple of Hkv (no K/V
expansion). flash-attn aligns its causal mask bottom-right (top-left in 2.0.x); ringmem only
asks for square causal blocks, where both agree, and this backend refuses any other.
"""
from __future__ import annotations

import importlib
import inspect
import sys
from typing import Any, Callable

import torch
from torch import Tensor

from ..masking import causal_flag
from .base import Backend, Mask

_MODULE = "flash_attn.flash_attn_interface"
_HALF = (torch.float16, torch.bfloat16)
# why the import failed, remembered so that `unsupported` stays cheap on machines without it
_import_error: str | None = None


def _interface() -> tuple[Any, str | None]:
    """(the flash_attn_interface module, None), or (None, why it cannot be imported)."""
    global _import_error
    mod = sys.modules.get(_MODULE)
    if mod is not None:
        return mod, None
    if _import_error is None:
        try:
            return importlib.import_module(_MODULE), None
        except ModuleNotFoundError as e:
            if e.name and e.name.split(".")[0] == "flash_attn":
                _import_error = "flash_attn is not installed (pip install flash-attn)"
            else:
                _import_error = f"flash_attn failed to import: {e}"
        except Exception as e:  # a CUDA extension built for another torch raises many kinds
            _import_error = f"flash_attn failed to import: {type(e).__name__}: {e}"
    return None, _import_error


def _param_names(fn: Callable[..., Any]) -> tuple[str, set[str]]:
    """(parameter names in order, the names that have defaults) of a flash-attn op."""
    target = getattr(fn, "_init_fn", fn)  # a torch.library CustomOpDef keeps the function
    try:
        params = [p for p in inspect.signature(target).parameters.values()
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    except (TypeError, ValueError):
        params = []
    if params:
        return (tuple(p.name for p in params),
                {p.name for p in params if p.default is not p.empty})
    op = getattr(fn, "_opoverload", None) or getattr(fn, "default", None) or fn
    schema = getattr(op, "_schema", None)
    if schema is None:
        raise RuntimeError(f"cannot read the parameters of {fn!r}")
    args = schema.arguments
    return tuple(a.name for a in args), {a.name for a in args if a.has_default_value()}


def _call(fn: Callable[..., Any], values: dict[str, Any]) -> Any:
    """Call fn with each of its parameters taken from `values` by name (defaults may be left)."""
    names, defaulted = _param_names(fn)
    missing = [n for n in names if n not in values and n not in defaulted]
    if missing:
        name = getattr(fn, "__name__", repr(fn))
        raise RuntimeError(f"flash_attn {name} takes parameters {missing} that ringmem does not "
                           f"know; supported: flash-attn 2.0 - 2.8")
    return fn(**{n: values[n] for n in names if n in values})


def _fixed_args(scale: float, causal: bool, deterministic: bool) -> dict[str, Any]:
    """Every non-tensor argument of either op in any 2.x version: no dropout, no window,
    no softcap, no ALiBi."""
    return {"dropout_p": 0.0, "softmax_scale": float(scale), "causal": bool(causal),
            "window_size": (-1, -1), "window_size_left": -1, "window_size_right": -1,
            "softcap": 0.0, "alibi_slopes": None, "return_softmax": False,
            "deterministic": deterministic, "rng_state": None}


def _unit_last(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()  # the CUDA op needs stride(-1) == 1


def _check(q: Tensor, k: Tensor, causal: bool) -> None:
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"flash_attn aligns causal masks bottom-right; ringmem's causal blocks "
                         f"must be square, got Sq={q.shape[1]}, Sk={k.shape[1]}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} are not a multiple of key heads "
                         f"{k.shape[2]}")


class FlashAttnBackend(Backend):
    """Block attention by flash-attn 2.x on CUDA (fp16/bf16, head_dim % 8 == 0, <= 256).

    deterministic: ask flash-attn for its deterministic (slower) backward.
    """

    name = "flash_attn"

    def __init__(self, deterministic: bool = False) -> None:
        self.deterministic = deterministic

    def unsupported(self, device: torch.device, dtype: torch.dtype, head_dim: int, *,
                    bands: bool = False, softcap: bool = False) -> str | None:
        if bands or softcap:  # flash-attn has both; not wired (no GPU with flash-attn here)
            return "ringmem calls flash_attn for full and causal blocks only (no window, softcap)"
        _, why = _interface()
        if why:
            return why
        if device.type != "cuda":
            return f"flash_attn runs on CUDA devices only, got device type {device.type!r}"
        if dtype not in _HALF:
            return f"flash_attn needs float16 or bfloat16, got {dtype}"
        if head_dim % 8 or head_dim > 256:
            return f"flash_attn needs head_dim % 8 == 0 and <= 256, got {head_dim}"
        if torch.version.hip is None and torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(device)
            if major < 8:
                return f"flash_attn 2 needs an Ampere or newer GPU, got sm{major}{minor}"
        return None

    def _ops(self) -> Any:
        mod, why = _interface()
        if mod is None:
            raise RuntimeError(why)
        return mod

    def fwd(self, q: Tensor, k: Tensor, v: Tensor, scale: float,
            causal: Mask) -> tuple[Tensor, Tensor]:
        causal = causal_flag(causal, self.name)
        _check(q, k, causal)
        b, sq, hq, d = q.shape
        if sq == 0 or k.shape[1] == 0:  # flash-attn gives lse = +inf for no keys; ringmem -inf
            return (q.new_zeros(b, sq, hq, v.shape[-1]),
                    torch.full((b, hq, sq), float("-inf"), dtype=torch.float32,
                               device=q.device))
        fa = self._ops()
        q, k, v = (_unit_last(x) for x in (q, k, v))
        res = _call(fa._flash_attn_forward,
                    {"q": q, "k": k, "v": v, **_fixed_args(scale, causal, self.deterministic)})
        if len(res) == 4:  # 2.7+: out, softmax_lse, S_dmask, rng_state
            out, lse = res[0], res[1]
        elif len(res) in (7, 8):  # out, q, k, v, out_padded, softmax_lse, S_dmask[, rng_state]
            out, lse = res[0], res[5]
        else:
            raise RuntimeError(f"flash_attn _flash_attn_forward returned {len(res)} values; "
                               f"expected 4, 7 or 8")
        return out, lse[..., :sq]

    def bwd(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
            scale: float, causal: Mask) -> tuple[Tensor, Tensor, Tensor]:
        causal = causal_flag(causal, self.name)
        _check(q, k, causal)
        if q.shape[1] == 0 or k.shape[1] == 0:
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        fa = self._ops()
        # flash-attn wants dout and out in q's dtype, lse as a contiguous fp32 [B, Hq, Sq]
        dout, out = dout.to(q.dtype), out.to(q.dtype)
        dout, q, k, v, out = (_unit_last(x) for x in (dout, q, k, v, out))
        lse = lse.to(torch.float32).contiguous()
        dq, dk, dv = (torch.empty_like(x, memory_format=torch.contiguous_format)
                      for x in (q, k, v))
        _call(fa._flash_attn_backward,
              {"dout": dout, "q": q, "k": k, "v": v, "out": out, "softmax_lse": lse,
               "dq": dq, "dk": dk, "dv": dv, **_fixed_args(scale, causal, self.deterministic)})
        return dq, dk, dv
