"""One `ring_attention` call: its local checks, the cross-rank agreement of its
signature, and the run (the autograd function around the ring loop, Ulysses around it).
`api.ring_attention` (eager) and `compiled` (the custom ops torch.compile sees) share it."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .agree import agree
from .arguments import dtype_error, flag_error, positive_number
from .backends import check_backend_name, get_backend
from .comm import CommStats, Group, RingComm, device_error
from .heads import heads_error
from .layouts import check_layout, local_len_error
from .masking import make_mask
from .mesh import sequence_rank, split_group
from .options import check_schedule
from .partial import Partial, acc_dtype, with_sink
from .plan import parse_option, plan, resolve_interconnect, ring_hop
from .ring import RingSpec, ring_backward, ring_forward
from .sharding import packing_digest
from .ulysses import fold_order, to_heads, to_seq

_TINY = torch.finfo(torch.float32).tiny


def _plain(x: object) -> object:
    """A user's option as `agree` can encode it (a bad one is already an error)."""
    return x if isinstance(x, (str, int, float)) or x is None else repr(x)


def _shape(x: object) -> tuple[int, ...]:
    return tuple(x.shape) if isinstance(x, Tensor) else (-1,)


def check_extras(q: Tensor, sinks: object, softcap: object) -> float:
    """Checks sinks and softcap; returns the softcap (0.0: none)."""
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
            raise TypeError(f"softcap must be a positive float or None, got {softcap!r}")
        positive_number("softcap", softcap)
    if sinks is not None:
        if not isinstance(sinks, Tensor):
            raise TypeError(f"sinks must be a torch.Tensor of shape [Hq] or None, got "
                            f"{type(sinks).__name__}")
        if tuple(sinks.shape) != (q.shape[2],) or not sinks.dtype.is_floating_point:
            raise ValueError(f"sinks must be a floating tensor of shape [Hq]=[{q.shape[2]}] "
                             f"(one logit per query head), got {sinks.dtype} "
                             f"{tuple(sinks.shape)}")
        if sinks.device != q.device:
            raise ValueError(f"sinks must be on q's device {q.device}, got {sinks.device}")
    return float(softcap or 0.0)


def _degrees(ulysses: object, world: int, fixed: int | None) -> tuple[int, ...] | str:
    """The Ulysses degrees a call may use (a mesh fixes one)."""
    if fixed is not None:
        if ulysses not in (1, "auto", fixed):
            raise ValueError(f"ulysses={ulysses!r} differs from the mesh's Ulysses group "
                             f"size {fixed}")
        return (fixed,)
    if ulysses == "auto":
        return "auto"
    if isinstance(ulysses, bool) or not isinstance(ulysses, int):
        raise TypeError(f"ulysses must be an int degree or 'auto', got {ulysses!r}")
    if ulysses < 1 or world % ulysses:
        raise ValueError(f"ulysses must be a degree dividing the group size {world}, got "
                         f"{ulysses}")
    return (ulysses,)


@dataclass(frozen=True)
class Call:
    """One `ring_attention` call's arguments as given, before any check."""
    q: Any
    k: Any
    v: Any
    causal: Any = True
    layout: Any = "zigzag"
    schedule: Any = "auto"
    backend: Any = "auto"
    softmax_scale: Any = None
    interconnect: Any = None
    stats: Any = None
    cu_seqlens: Any = None
    window: Any = (-1, -1)
    sinks: Any = None
    softcap: Any = None
    ulysses: Any = 1
    return_lse: Any = False


@dataclass(frozen=True)
class Validated:
    """A call checked on this rank: the ring loop's spec (over world / ulysses ranks) and
    the Ulysses degree, or the error to raise on every rank (spec None)."""
    spec: RingSpec | None
    ulysses: int = 1
    error: BaseException | None = None


def _validate(c: Call, world: int, grad: bool, fixed: int | None) -> Validated:
    """Local checks of `c` on a group of `world` ranks (`fixed`: a mesh's Ulysses degree;
    `grad`: a backward will run). Errors name the argument and the value."""
    q, k, v, causal, layout, schedule = c.q, c.k, c.v, c.causal, c.layout, c.schedule
    softmax_scale, return_lse, ulysses = c.softmax_scale, c.return_lse, c.ulysses
    if c.stats is not None and not isinstance(c.stats, CommStats):
        return Validated(None, 1, TypeError(f"stats must be a ringmem.CommStats or None, "
                                            f"got {type(c.stats).__name__}"))
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            return Validated(None, 1, TypeError(f"{name} must be a torch.Tensor, got "
                                                f"{type(t).__name__}"))
    for name, flag in (("causal", causal), ("return_lse", return_lse)):
        if flag_error(name, flag):
            return Validated(None, 1, flag_error(name, flag))
    if softmax_scale is not None and (isinstance(softmax_scale, bool)
                                      or not isinstance(softmax_scale, (int, float))):
        return Validated(None, 1, TypeError(f"softmax_scale must be a float or None, got "
                                            f"{softmax_scale!r}"))
    try:
        degrees = _degrees(ulysses, world, fixed)
        check_layout(layout)
        check_schedule(schedule)
        check_backend_name(c.backend)
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dim() != 4:
                raise ValueError(f"{name} must be 4-D [B, S_local, H, D], got shape "
                                 f"{tuple(t.shape)}")
            if not t.dtype.is_floating_point:
                raise ValueError(f"{name} must have a floating dtype, got {t.dtype}")
        if not (q.dtype == k.dtype == v.dtype):
            raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        if dtype_error("q", q.dtype):  # float8: before any backend trips over it
            raise dtype_error("q", q.dtype)
        if not (q.device == k.device == v.device):
            raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, "
                             f"{v.device}")
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and "
                             f"{tuple(v.shape)}")
        (bq, sq, hq, dq), (bk, sk, hkv, dk) = q.shape, k.shape
        if sq == 0:
            raise ValueError(f"q has no tokens (q.shape {tuple(q.shape)})")
        if dq == 0 or hq == 0 or bq == 0:
            raise ValueError(f"q must have a batch, heads and a head dim of at least 1, got "
                             f"q.shape {tuple(q.shape)}")
        if (bq, dq) != (bk, dk) or (causal and sq != sk):
            raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, "
                             f"head dim and (when causal) local sequence length "
                             f"([B, S_local, H, D])")
        if hkv == 0 or hq % hkv:
            raise ValueError(f"the number of query heads (q.shape[2]={hq}) must be a multiple "
                             f"of the number of key/value heads (k.shape[2]={hkv})")
        mask = make_mask(causal, c.window, c.cu_seqlens, bq, layout, world, sq)
        if not mask.plain and sq != sk:
            raise ValueError(f"cu_seqlens and window need q and k of one local length (self-"
                             f"attention over one sequence), got {sq} and {sk}")
        err = local_len_error(layout, sq, world) if causal or not mask.plain else None
        if err:
            raise ValueError(f"q.shape[1]={sq}: {err}")
        cap = check_extras(q, c.sinks, c.softcap)
        # >= the smallest normal float: a subnormal scale gives NaN
        scale = (1.0 / math.sqrt(dq) if softmax_scale is None
                 else positive_number("softmax_scale", softmax_scale, _TINY))
        impl = get_backend(c.backend, q.device, q.dtype, dq, bands=mask.window[0] >= 0,
                           softcap=cap > 0)
        ic = resolve_interconnect(c.interconnect, q.device.type)
        for u in degrees if degrees != "auto" else ():
            err = heads_error(hq, hkv, u)
            if err:
                raise ValueError(f"q.shape[2]={hq}: {err}")
    except (ValueError, TypeError) as e:
        return Validated(None, 1, e)
    u, resolved = (degrees[0] if degrees != "auto" else 1), schedule
    if schedule == "auto" or degrees == "auto":  # deterministic in the agreed shapes/options
        inter, per_node = _nodes(q, world)
        choice = plan(tuple(q.shape), tuple(k.shape), world=world, dtype=q.dtype,
                      layout=layout, interconnect=ic, device_type=q.device.type,
                      backward=grad, mask=mask, ulysses=degrees if degrees == "auto" else u,
                      schedule=schedule, inter_node=inter, gpus_per_node=per_node,
                      return_lse=return_lse).choice
        u, resolved = parse_option(choice, world)
    r = world // u
    return Validated(RingSpec(layout=layout, mask=mask, scale=scale, backend=impl,
                              schedule=resolved, softcap=cap, fold=u,
                              hop=ring_hop(layout, r, u * sq, u * sk, mask, resolved, u)), u)


def _nodes(q: Tensor, world: int) -> tuple[str | None, int]:
    """(inter-node link, ranks per node) for the cost model: torchrun's LOCAL_WORLD_SIZE
    smaller than the group means the group spans nodes (modelled as InfiniBand)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    if q.device.type == "cuda" and 0 < local < world and world % local == 0:
        return "ib", local
    return None, 0


def forward_core(q: Tensor, k: Tensor, v: Tensor, sinks: Tensor | None, spec: RingSpec,
                 group: Group, stats: CommStats | None, grad: bool) -> tuple[Tensor, Tensor]:
    """The ring loop's forward and the sinks: out [B, S, Hq, D], lse [B, Hq, S]."""
    comm = RingComm(group, "fwd", stats, q.device)
    if grad:  # the backward's return channel, made while every rank is in this call: a
        comm.prepare_returns()  # skipped backward cannot strand its peers in new_group
    out, lse = ring_forward(q, k, v, spec, comm)
    if sinks is not None:  # out [B, S, Hq, D], lse [B, Hq, S]: the sink per head
        o, lse_t = with_sink(Partial(out, lse.transpose(1, 2)), sinks)
        out, lse = o.to(out.dtype), lse_t.transpose(1, 2).contiguous()
    return out, lse


def backward_core(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  sinks: Tensor | None, spec: RingSpec, group: Group,
                  stats: CommStats | None, sinks_grad: bool
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """dq, dk, dv (and d sinks, when asked) of `forward_core`."""
    dq, dk, dv = ring_backward(dout.contiguous(), q, k, v, out, lse, spec,
                               RingComm(group, "bwd", stats, q.device))
    dsinks = None
    if sinks is not None and sinks_grad:
        # d sink = -sum over rows of p_sink * rowsum(dO * O): this rank's rows only
        acc = acc_dtype(q.dtype)
        delta = (dout.to(acc) * out.to(acc)).sum(-1).transpose(1, 2)  # [B, Hq, S]
        dsinks = -(torch.exp(sinks.to(acc)[None, :, None] - lse) * delta).sum((0, 2))
        dsinks = dsinks.to(sinks.dtype)
    return dq, dk, dv, dsinks


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, sinks: Tensor | None, spec: RingSpec,
                group: Group, stats: CommStats | None):
        out, lse = forward_core(q, k, v, sinks, spec, group, stats,
                                any(ctx.needs_input_grad[:4]))
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.spec, ctx.group, ctx.stats = spec, group, stats
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable  # the ring backward is not itself traced
    def backward(ctx, dout: Tensor, _dlse: Tensor):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        dq, dk, dv, dsinks = backward_core(dout, q, k, v, out, lse, sinks, ctx.spec,
                                           ctx.group, ctx.stats, ctx.needs_input_grad[3])
        return dq, dk, dv, dsinks, None, None, None


@dataclass(frozen=True)
class Agreed:
    """A call checked on every rank of its group(s): the ring loop's spec, the Ulysses
    degree and the mesh's groups (None: `group` alone)."""
    spec: RingSpec
    ulysses: int
    sp: Any


def agreed(c: Call, group: Group, mesh: object, grad: bool) -> Agreed:
    """Check `c` on this rank and agree its signature with every rank of the group (or of
    both mesh groups): an error anywhere is raised on every rank, naming the difference.
    grad: a backward will run (it can change the plan's choice)."""
    q, k, v, sinks, causal, ulysses = c.q, c.k, c.v, c.sinks, c.causal, c.ulysses
    sp, _, world = sequence_rank(group, mesh)
    fixed = sp.u if sp is not None else None
    try:  # any failure while validating, of any type, is raised on every rank together
        checked = _validate(c, world, grad, fixed)
    except Exception as e:  # noqa: BLE001 (re-raised by agree, after the exchange)
        checked = Validated(None, 1, e)
    spec, u, error = checked.spec, checked.ulysses, checked.error
    if world > 1:
        fields = {
            "q.shape": _shape(q), "k.shape": _shape(k), "v.shape": _shape(v),
            "dtype": q.dtype if isinstance(q, Tensor) else None,
            "device type": q.device.type if isinstance(q, Tensor) else None,
            "causal": int(bool(causal)), "layout": _plain(c.layout),
            "schedule": _plain(c.schedule), "ulysses": _plain(ulysses),
            "backend": _plain(c.backend), "softmax_scale": spec.scale if spec else None,
            "requires grad": int(grad), "return_lse": int(bool(c.return_lse)),
            "window": spec.mask.window if spec else None,
            "cu_seqlens": packing_digest(spec.mask.docs) if spec else None,
            "softcap": spec.softcap if spec else None,
            "sinks.shape": _shape(sinks) if sinks is not None else None,
            # derived from the above (the plan's choice): listed after its causes
            "resolved schedule": spec.schedule if spec else None,
            "resolved ulysses": u if spec else None}
        if sp is None:
            agree("ring_attention", group, error, **fields)
        else:  # every rank shares a Ulysses group or a ring with every other: both agree
            try:
                agree("ring_attention", sp.ulysses_group, error, **fields,
                      **{"mesh ring rank": sp.r_rank})
            except Exception as e:  # noqa: BLE001 (carried into the ring's agreement)
                error = e
            agree("ring_attention", sp.ring_group, error, **fields,
                  **{"mesh ulysses rank": sp.u_rank})
        # the ring's groups must carry q's device; agreed above, so every rank raises alike
        for g in ((group,) if sp is None else (sp.ulysses_group, sp.ring_group)):
            if (bad := device_error(g, q.device)) is not None:
                raise bad
    elif error is not None:
        raise error
    return Agreed(spec, u, sp)


def run(c: Call, group: Group, a: Agreed) -> tuple[Tensor, Tensor | None]:
    """The agreed call, eager: (out, lse or None) as `return_lse` asks."""
    q, k, v, sinks, stats, spec, u, sp = c.q, c.k, c.v, c.sinks, c.stats, a.spec, a.ulysses, a.sp
    if u == 1:
        out, lse = _RingAttention.apply(q, k, v, sinks, spec, group if sp is None
                                        else sp.ring_group, stats)
        return out, (lse if c.return_lse else None)
    sp = sp if sp is not None else split_group(group, u)
    ctl = (sp.ulysses_group, sp.u_rank, stats, sp.r)
    order = fold_order(c.layout, spec.mask, sp.r, sp.r_rank, u, q.shape[1])
    qs, ks, vs, sl = to_heads(q, k, v, sinks, q.shape[2], k.shape[2], ctl, order)
    out, lse = _RingAttention.apply(qs, ks, vs, sl, spec, sp.ring_group, stats)
    return to_seq(out, lse if c.return_lse else None, ctl, order)
