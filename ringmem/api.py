"""Public entry point: ring_attention (shard / unshard live in `sharding`)."""
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
from .options import CHOICES, check_schedule
from .partial import Partial, acc_dtype, with_sink
from .plan import Interconnect, parse_option, plan, resolve_interconnect, ring_hop
from .ring import RingSpec, ring_backward, ring_forward
from .sharding import packing_digest, shard, unshard
from .ulysses import fold_order, to_heads, to_seq

__all__ = ["SCHEDULES", "ring_attention", "shard", "unshard"]

SCHEDULES = CHOICES  # "auto" and the ring schedules (`ringmem.options`)
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


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, sinks: Tensor | None, spec: RingSpec,
                group: Group, stats: CommStats | None):
        comm = RingComm(group, "fwd", stats, q.device)
        if any(ctx.needs_input_grad[:4]):  # the backward's return channel, made while every
            comm.prepare_returns()  # rank is in this call: a skipped backward cannot strand
        out, lse = ring_forward(q, k, v, spec, comm)  # its peers in new_group's raw wait
        if sinks is not None:  # out [B, S, Hq, D], lse [B, Hq, S]: the sink per head
            o, lse_t = with_sink(Partial(out, lse.transpose(1, 2)), sinks)
            out, lse = o.to(out.dtype), lse_t.transpose(1, 2).contiguous()
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.spec, ctx.group, ctx.stats = spec, group, stats
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable  # the ring backward is not itself traced
    def backward(ctx, dout: Tensor, _dlse: Tensor):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        dq, dk, dv = ring_backward(dout.contiguous(), q, k, v, out, lse, ctx.spec,
                                   RingComm(ctx.group, "bwd", ctx.stats, q.device))
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[3]:
            # d sink = -sum over rows of p_sink * rowsum(dO * O): this rank's rows only
            acc = acc_dtype(q.dtype)
            delta = (dout.to(acc) * out.to(acc)).sum(-1).transpose(1, 2)  # [B, Hq, S]
            dsinks = -(torch.exp(sinks.to(acc)[None, :, None] - lse) * delta).sum((0, 2))
            dsinks = dsinks.to(sinks.dtype)
        return dq, dk, dv, dsinks, None, None, None


def ring_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True,
                   group: Group = None, layout: str = "zigzag", schedule: str = "auto",
                   backend: str = "auto", softmax_scale: float | None = None,
                   return_lse: bool = False, stats: CommStats | None = None,
                   interconnect: str | Interconnect | None = None,
                   cu_seqlens: object = None, window: tuple[int, int] = (-1, -1),
                   sinks: Tensor | None = None, softcap: float | None = None,
                   ulysses: int | str = 1, mesh: object = None
                   ) -> Tensor | tuple[Tensor, Tensor]:
    """Exact attention over a sequence sharded across the ranks of `group`.

    Args:
        q: [B, S_local, Hq, D], this rank's shard of the queries (see `shard`).
        k, v: [B, S_local, Hkv, D], Hq a multiple of Hkv (GQA/MQA; K/V are never expanded
            before communication).
        causal: causal mask over *global* positions, as the layout assigns them.
        group: the sequence-parallel process group; None = default group (world size 1
            when torch.distributed is not initialised).
        layout: "zigzag" (balanced causal work), "contiguous", "stripe", or "document"
            (packed documents, each split head-tail over the ranks; needs cu_seqlens).
        schedule: "kv" (K/V travel, Q stays), "q" (TokenRing: Q travels, partial outputs
            return to their owner at the same time), "allgather" (each rank fetches the K/V
            spans its queries' masks read straight from their owners, all at once; dK/dV
            go back to their owners: Llama-3's / PyTorch CP's all-gather, trimmed) or
            "auto" (cost model, `ringmem.plan`).
        ulysses: Ulysses degree u: groups of u consecutive ranks exchange sequence shards for
            head shards (all-to-all) around the ring loop, which then runs across the
            groups (u = group size: pure Ulysses; 1: ring only). u must divide the group
            size and the query heads; "auto": the cost model picks u and the schedule.
        mesh: instead of `group`, a (ulysses_group, ring_group) pair or a DeviceMesh with
            dims "ulysses" and "ring": the sequence is sharded over all u * r ranks in the
            order ring_rank * u + ulysses_rank (`ringmem.mesh`).
        backend: "sdpa" (PyTorch fused flash ops), "torch" (plain PyTorch, any dtype), "auto".
        softmax_scale: defaults to 1/sqrt(D).
        return_lse: also return lse [B, Hq, S_local] (fp32; fp64 for fp64 inputs).
        stats: a `CommStats` that records the bytes this rank sends and receives per step
            (forward, and backward when it runs).
        interconnect: link model for schedule="auto": "nvlink", "nvswitch", "pcie", "ib",
            "loopback" or an `Interconnect`; default by device (CUDA: nvlink, CPU:
            loopback; on CUDA a group beyond torchrun's LOCAL_WORLD_SIZE adds "ib" between
            nodes).
        cu_seqlens: packed documents, flash-attn offsets [0, ..., S] into the global row
            (int32 tensor or ints; a list or 2-D tensor for one packing per batch row): a
            token sees only its own document. Blocks whose documents never meet are skipped.
        window: (left, right) sliding window in positions, -1 unbounded (flash-attn's
            window_size): key j is seen from query i iff i - left <= j <= i + right. Steps
            outside every window are neither computed nor sent (use layout "contiguous").
        sinks: [Hq] learnable logits, one per query head, added to every row's softmax
            denominator (GPT-OSS). Its gradient is this rank's rows' share: sum it over the
            group like any replicated parameter's.
        softcap: logits become softcap * tanh(logits / softcap) (Gemma 2); backends
            without it are refused by name ("auto" picks one that has it).

    Returns out [B, S_local, Hq, D] in q's dtype (and lse, sinks included). Differentiable
    in q, k, v (and sinks). Rows that see no key (pads) give out 0 and lse -inf. Non-finite
    inputs give the same result on every backend and at every world size: a row's out and
    lse are NaN iff its query row, or a key or value it sees, holds NaN or inf (a key full
    of -inf is not a mask: use cu_seqlens or window for that).
    Every rank must call with the same shapes, dtype and options: a difference raises the
    same ValueError on every rank.

    Example::

        q, k, v = (ringmem.shard(t, layout="zigzag") for t in (q_full, k_full, v_full))
        out = ringmem.ring_attention(q, k, v, causal=True)
    """
    sp, _, world = sequence_rank(group, mesh)
    fixed = sp.u if sp is not None else None
    grad = torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad
                                           for t in (q, k, v, sinks))
    call = Call(q, k, v, causal, layout, schedule, backend, softmax_scale, interconnect,
                stats, cu_seqlens, window, sinks, softcap, ulysses, return_lse)
    try:  # any failure while validating, of any type, is raised on every rank together
        checked = _validate(call, world, grad, fixed)
    except Exception as e:  # noqa: BLE001 (re-raised by agree, after the exchange)
        checked = Validated(None, 1, e)
    spec, u, error = checked.spec, checked.ulysses, checked.error
    if world > 1:
        fields = {
            "q.shape": _shape(q), "k.shape": _shape(k), "v.shape": _shape(v),
            "dtype": q.dtype if isinstance(q, Tensor) else None,
            "device type": q.device.type if isinstance(q, Tensor) else None,
            "causal": int(bool(causal)), "layout": _plain(layout),
            "schedule": _plain(schedule), "ulysses": _plain(ulysses),
            "backend": _plain(backend), "softmax_scale": spec.scale if spec else None,
            "requires grad": int(grad), "return_lse": int(bool(return_lse)),
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
    if u == 1:
        out, lse = _RingAttention.apply(q, k, v, sinks, spec, group if sp is None
                                        else sp.ring_group, stats)
        return (out, lse) if return_lse else out
    sp = sp if sp is not None else split_group(group, u)
    ctl = (sp.ulysses_group, sp.u_rank, stats, sp.r)
    order = fold_order(layout, spec.mask, sp.r, sp.r_rank, u, q.shape[1])
    qs, ks, vs, sl = to_heads(q, k, v, sinks, q.shape[2], k.shape[2], ctl, order)
    out, lse = _RingAttention.apply(qs, ks, vs, sl, spec, sp.ring_group, stats)
    out, lse = to_seq(out, lse if return_lse else None, ctl, order)
    return (out, lse) if return_lse else out
