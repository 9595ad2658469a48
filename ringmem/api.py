"""Public entry points: ring_attention, shard, unshard."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .agree import agree
from .backends import check_backend_name, get_backend
from .comm import CommStats, Group, RingComm, gather_rows, group_rank_world
from .layouts import check_layout, global_permutation, local_len_error, positions
from .layouts import split_len
from .plan import Interconnect, plan, resolve_interconnect
from .ring import RingSpec, ring_backward, ring_forward

SCHEDULES = ("auto", "kv", "q")


def _plain(x: object) -> object:
    """A user's option as `agree` can encode it (a bad one is already an error)."""
    return x if isinstance(x, (str, int, float)) or x is None else repr(x)


def _shape(x: object) -> tuple[int, ...]:
    return tuple(x.shape) if isinstance(x, Tensor) else (-1,)


def _validate(q, k, v, causal, layout, schedule, backend, softmax_scale, world, interconnect,
              grad, stats):
    """Local checks; returns (spec, error). Errors name the argument and the value."""
    if stats is not None and not isinstance(stats, CommStats):
        return None, TypeError(f"stats must be a ringmem.CommStats or None, "
                               f"got {type(stats).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            return None, TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not isinstance(causal, bool):
        return None, TypeError(f"causal must be a bool, got {causal!r}")
    if softmax_scale is not None and (isinstance(softmax_scale, bool)
                                      or not isinstance(softmax_scale, (int, float))):
        return None, TypeError(f"softmax_scale must be a float or None, got {softmax_scale!r}")
    try:
        check_layout(layout)
        if not isinstance(schedule, str) or schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        check_backend_name(backend)
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dim() != 4:
                raise ValueError(f"{name} must be 4-D [B, S_local, H, D], got shape "
                                 f"{tuple(t.shape)}")
            if not t.dtype.is_floating_point:
                raise ValueError(f"{name} must have a floating dtype, got {t.dtype}")
        if not (q.dtype == k.dtype == v.dtype):
            raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        if not (q.device == k.device == v.device):
            raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, "
                             f"{v.device}")
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and "
                             f"{tuple(v.shape)}")
        (bq, sq, hq, dq), (bk, sk, hkv, dk) = q.shape, k.shape
        if sq == 0:
            raise ValueError(f"q has no tokens (q.shape {tuple(q.shape)})")
        if (bq, dq) != (bk, dk) or (causal and sq != sk):
            raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, "
                             f"head dim and (when causal) local sequence length "
                             f"([B, S_local, H, D])")
        if hkv == 0 or hq % hkv:
            raise ValueError(f"the number of query heads (q.shape[2]={hq}) must be a multiple "
                             f"of the number of key/value heads (k.shape[2]={hkv})")
        err = local_len_error(layout, sq, world) if causal else None  # positions matter
        if err:
            raise ValueError(f"q.shape[1]={sq}: {err}")
        scale = 1.0 / math.sqrt(dq) if softmax_scale is None else float(softmax_scale)
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"softmax_scale must be a positive finite number, got "
                             f"{softmax_scale!r}")
        impl = get_backend(backend, q.device, q.dtype, dq)
        ic = resolve_interconnect(interconnect, q.device.type)
    except ValueError as e:
        return None, e
    resolved = schedule
    if schedule == "auto":  # deterministic in the (rank-agreed) shapes and options
        resolved = plan(tuple(q.shape), tuple(k.shape), world=world, dtype=q.dtype,
                        causal=causal, layout=layout, interconnect=ic,
                        device_type=q.device.type, backward=grad).choice
    return RingSpec(layout=layout, causal=causal, scale=scale, backend=impl,
                    schedule=resolved), None


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, spec: RingSpec, group: Group,
                stats: CommStats | None):
        out, lse = ring_forward(q, k, v, spec, RingComm(group, "fwd", stats, q.device))
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spec, ctx.group, ctx.stats = spec, group, stats
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable  # the ring backward is not itself traced
    def backward(ctx, dout: Tensor, _dlse: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(dout.contiguous(), q, k, v, out, lse, ctx.spec,
                                   RingComm(ctx.group, "bwd", ctx.stats, q.device))
        return dq, dk, dv, None, None, None


def ring_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True,
                   group: Group = None, layout: str = "zigzag", schedule: str = "auto",
                   backend: str = "auto", softmax_scale: float | None = None,
                   return_lse: bool = False, stats: CommStats | None = None,
                   interconnect: str | Interconnect | None = None
                   ) -> Tensor | tuple[Tensor, Tensor]:
    """Exact attention over a sequence sharded across the ranks of `group`.

    Args:
        q: [B, S_local, Hq, D], this rank's shard of the queries (see `shard`).
        k, v: [B, S_local, Hkv, D], Hq a multiple of Hkv (GQA/MQA; K/V are never expanded
            before communication).
        causal: causal mask over *global* positions, as the layout assigns them.
        group: the sequence-parallel process group; None = default group (world size 1
            when torch.distributed is not initialised).
        layout: "zigzag" (balanced causal work), "contiguous" or "stripe".
        schedule: "kv" (K/V travel, Q stays), "q" (TokenRing: Q travels, partial outputs
            return to their owner at the same time) or "auto" (cost model, `ringmem.plan`).
        backend: "sdpa" (PyTorch fused flash ops), "torch" (plain PyTorch, any dtype), "auto".
        softmax_scale: defaults to 1/sqrt(D).
        return_lse: also return lse [B, Hq, S_local] (fp32; fp64 for fp64 inputs).
        stats: a `CommStats` that records the bytes this rank sends and receives per step
            (forward, and backward when it runs).
        interconnect: link model for schedule="auto": "nvlink", "pcie", "loopback" or an
            `Interconnect`; default by device (CUDA: nvlink, CPU: loopback).

    Returns out [B, S_local, Hq, D] in q's dtype (and lse). Differentiable in q, k, v.
    Every rank must call with the same shapes, dtype and options: a difference raises the
    same ValueError on every rank.

    Example::

        q, k, v = (ringmem.shard(t, layout="zigzag") for t in (q_full, k_full, v_full))
        out = ringmem.ring_attention(q, k, v, causal=True)
    """
    rank, world = group_rank_world(group)
    grad = torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad
                                           for t in (q, k, v))
    try:  # any failure while validating, of any type, is raised on every rank together
        spec, error = _validate(q, k, v, causal, layout, schedule, backend, softmax_scale,
                                world, interconnect, grad, stats)
    except Exception as e:  # noqa: BLE001 (re-raised by agree, after the exchange)
        spec, error = None, e
    if world > 1:
        agree("ring_attention", group, error, **{
            "q.shape": _shape(q), "k.shape": _shape(k), "v.shape": _shape(v),
            "dtype": q.dtype if isinstance(q, Tensor) else None,
            "device type": q.device.type if isinstance(q, Tensor) else None,
            "causal": int(bool(causal)), "layout": _plain(layout),
            "schedule": _plain(schedule),
            "resolved schedule": spec.schedule if spec else None,
            "backend": _plain(backend), "softmax_scale": spec.scale if spec else None,
            "requires grad": int(grad)})
    elif error is not None:
        raise error
    out, lse = _RingAttention.apply(q, k, v, spec, group, stats)
    return (out, lse) if return_lse else out


def _check_dim(x: Tensor, dim: int) -> int:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim!r} is out of range for a {x.dim()}-D tensor")
    return dim % x.dim()


def shard(x: Tensor, dim: int = 1, *, group: Group = None, layout: str = "zigzag") -> Tensor:
    """This rank's shard of the full tensor `x` along `dim` (global positions per `layout`).

    x: [..., S, ...] with S divisible by the layout's chunk count (world, or 2*world for
    zigzag). Returns [..., S / world, ...]. Differentiable.
    """
    dim = _check_dim(x, dim)
    check_layout(layout)
    rank, world = group_rank_world(group)
    local = split_len(layout, x.shape[dim], world)
    idx = positions(layout, rank, world, local).to(x.device)
    return x.index_select(dim, idx)


def unshard(x: Tensor, dim: int = 1, *, group: Group = None, layout: str = "zigzag") -> Tensor:
    """The full tensor, on every rank, from each rank's shard `x` along `dim` (inverse of
    `shard`). Shards must have the same shape and dtype on every rank. Not differentiable.
    """
    rank, world = group_rank_world(group)
    error = None
    try:  # collected, not raised: a bad call on one rank must not strand the others
        dim = _check_dim(x, dim)
        check_layout(layout)
        err = local_len_error(layout, x.shape[dim], world)
        if err:
            raise ValueError(f"x.shape[{dim}]={x.shape[dim]}: {err}")
    except (TypeError, ValueError) as e:
        error = e
    ok = error is None
    agree("unshard", group, error, **{"x.shape": tuple(x.shape) if ok else None,
             "dtype": x.dtype if isinstance(x, Tensor) else None,
             "dim": dim if ok else None, "layout": layout if ok else None})
    if world == 1:
        return x
    rows = gather_rows(x.reshape(-1), group, world)  # [world, numel]
    gathered = torch.cat(rows.reshape(world, *x.shape).unbind(0), dim=dim)
    perm = global_permutation(layout, world, x.shape[dim]).to(x.device)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return gathered.index_select(dim, inverse)
