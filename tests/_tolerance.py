"""Tolerances derived from a same-dtype baseline (flash-attention's rule).

A fast path passes when its error against a float64 reference is at most `factor` times the
error of a plain PyTorch computation in the same dtype, plus the dtype's rounding error at
the reference's magnitude. `outputs_and_grads` computes what is compared.
"""
from __future__ import annotations

import torch
from torch import Tensor


def rounding(ref: Tensor, dtype: torch.dtype) -> float:
    return 2 * torch.finfo(dtype).eps * ref.abs().max().item()


def check_close(name: str, got: Tensor, ref: Tensor, base: Tensor, dtype: torch.dtype,
                factor: float = 2.0, extra: float = 0.0) -> str | None:
    """None if |got - ref| <= factor * |base - ref| + rounding + extra, else a message;
    `extra` is an error source of the fast path the baseline does not share (derived by
    the caller, never a guess)."""
    err = (got.double() - ref.double()).abs().max().item()
    base_err = (base.double() - ref.double()).abs().max().item()
    bound = factor * base_err + rounding(ref, dtype) + extra
    if not err <= bound:  # also catches nan
        return f"{name}: err {err:.3e} > bound {bound:.3e} (baseline err {base_err:.3e})"
    return None


def outputs_and_grads(fn, q: Tensor, k: Tensor, v: Tensor,
                      dout: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
    """(out, lse, [dq, dk, dv]) of `fn(q, k, v) -> (out, lse)` on fresh leaves, the
    backward seeded with `dout`: what a fast path and its references are compared on."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = fn(*leaves)
    out.backward(dout.to(out.dtype))
    return out.detach(), lse.detach(), [t.grad for t in leaves]
