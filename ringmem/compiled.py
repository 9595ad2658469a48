"""`ring_attention` as torch.library custom ops, for torch.compile.

Under `torch.compile` the ring loop (isend/irecv, host-side agreement, `.tolist()` of
plans) would break the graph at every step. Instead the call becomes one opaque op,
`ringmem::ring_attention`, with a fake (meta) implementation giving its output shapes
and a registered backward (`ringmem::ring_attention_backward`), so a model that calls it
traces with no graph break (`fullgraph=True`). The op's real implementation is the eager
path: every call's signature is still agreed across the ranks (`call.agreed`), inside
the op, and the ring loop runs as in eager mode.

The op takes only what a schema can carry: the group by name (None: the default group),
the interconnect by name, cu_seqlens as an int tensor, the Ulysses degree as an int (0:
"auto"). What it cannot carry is refused by name: a `mesh`, `stats`, an `Interconnect`
object. With Ulysses the op runs the all-to-alls around the loop itself; its backward
re-shards q, k, v, out and dout the same way (three more all-to-alls than eager, which
keeps the head-split tensors alive instead) and sends the gradients back.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .call import Call, _validate, agreed, backward_core, forward_core
from .comm import Group, group_rank_world
from .mesh import split_group
from .sharding import packing_of_positions
from .ulysses import fold_order, from_seq, grads_to_seq, to_heads, to_seq


def _group(name: str) -> Group:
    if not name:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group
    return _resolve_process_group(name)


def _packing(cu_seqlens: Tensor | None, position_ids: Tensor | None, group: Group,
             layout: str) -> object:
    if cu_seqlens is not None or position_ids is None:
        return cu_seqlens
    return packing_of_positions(position_ids, group=group, layout=layout)


def _call(q: Tensor, k: Tensor, v: Tensor, sinks: Tensor | None, cu_seqlens: Tensor | None,
          causal: bool, layout: str, schedule: str, backend: str,
          softmax_scale: float | None, window: list[int], softcap: float | None,
          interconnect: str | None, ulysses: int) -> Call:
    return Call(q, k, v, causal, layout, schedule, backend, softmax_scale, interconnect, None,
                cu_seqlens, tuple(window), sinks, softcap, ulysses or "auto", True)


def _ulysses(group: Group, u: int, layout: str, spec: Any, q: Tensor) -> tuple:
    """(mesh of degree u over the group, the all-to-alls' control tuple, the fold order)."""
    sp = split_group(group, u)
    return (sp, (sp.ulysses_group, sp.u_rank, None, sp.r),
            fold_order(layout, spec.mask, sp.r, sp.r_rank, u, q.shape[1]))


@torch.library.custom_op("ringmem::ring_attention", mutates_args=())
def ring_attention_op(q: Tensor, k: Tensor, v: Tensor, sinks: Tensor | None,
                      cu_seqlens: Tensor | None, position_ids: Tensor | None,
                      group_name: str, causal: bool, layout: str, schedule: str,
                      backend: str, softmax_scale: float | None,
                      window: list[int], softcap: float | None, interconnect: str | None,
                      ulysses: int, grad: bool) -> tuple[Tensor, Tensor]:
    """out [B, S, Hq, D], lse [B, Hq, S]: `ring_attention(..., return_lse=True)` with
    ulysses=1; grad: a backward will run (agreed, and it sets up the return channel);
    position_ids: this rank's shard of the global positions, to read packed documents off
    (`sharding.packing_of_positions`, a collective) where cu_seqlens is None."""
    group = _group(group_name)
    cu = _packing(cu_seqlens, position_ids, group, layout)
    c = _call(q, k, v, sinks, cu, causal, layout, schedule, backend, softmax_scale,
              window, softcap, interconnect, ulysses)
    a = agreed(c, group, None, grad)
    if a.ulysses == 1:
        return forward_core(q, k, v, sinks, a.spec, group, None, grad)
    sp, ctl, order = _ulysses(group, a.ulysses, layout, a.spec, q)
    with torch.no_grad():  # the op's own backward, not autograd, mirrors the all-to-alls
        qs, ks, vs, sl = to_heads(q, k, v, sinks, q.shape[2], k.shape[2], ctl, order)
        out, lse = forward_core(qs, ks, vs, sl, a.spec, sp.ring_group, None, grad)
        out, lse = to_seq(out, lse, ctl, order)
    return out, lse


@ring_attention_op.register_fake
def _(q, k, v, sinks, cu_seqlens, position_ids, group_name, causal, layout, schedule,
      backend, softmax_scale, window, softcap, interconnect, ulysses, grad):
    b, s, hq, _ = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (q.new_empty(q.shape), q.new_empty((b, hq, s), dtype=acc))


@torch.library.custom_op("ringmem::ring_attention_backward", mutates_args=())
def ring_attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                               lse: Tensor, sinks: Tensor | None,
                               cu_seqlens: Tensor | None, position_ids: Tensor | None,
                               group_name: str, causal: bool,
                               layout: str, schedule: str, backend: str,
                               softmax_scale: float | None, window: list[int],
                               softcap: float | None, interconnect: str | None,
                               ulysses: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv, d sinks (empty without sinks) of `ring_attention_op`. The forward
    agreed the call: the spec is re-derived locally (deterministic in the agreed values)."""
    group = _group(group_name)
    cu = _packing(cu_seqlens, position_ids, group, layout)
    c = _call(q, k, v, sinks, cu, causal, layout, schedule, backend, softmax_scale,
              window, softcap, interconnect, ulysses)
    checked = _validate(c, group_rank_world(group)[1], True, None)
    if checked.spec is None:  # the forward raised this already: it cannot get here
        raise checked.error or RuntimeError("ring_attention_backward: no spec")
    spec, u = checked.spec, checked.ulysses
    if u == 1:
        dq, dk, dv, ds = backward_core(dout, q, k, v, out, lse, sinks, spec, group, None,
                                       sinks is not None)
        return dq, dk, dv, ds if ds is not None else q.new_empty(0)
    sp, ctl, order = _ulysses(group, u, layout, spec, q)
    hq, hkv = q.shape[2], k.shape[2]
    # everything as the loop held it: this rank's heads, the group's tokens
    qs, ks, vs, sl = to_heads(q, k, v, sinks, hq, hkv, ctl, order)
    out_h, lse_h = from_seq(out, lse, ctl, order)
    dout_h, _ = from_seq(dout, None, ctl, order)
    dq, dk, dv, ds = backward_core(dout_h, qs, ks, vs, out_h, lse_h, sl, spec,
                                   sp.ring_group, None, sinks is not None)
    dq, dk, dv = grads_to_seq(dq, dk, dv, hq, hkv, ctl, order)
    if ds is None:
        return dq, dk, dv, q.new_empty(0)
    hl = hq // u
    full = torch.zeros_like(sinks)  # this rank's heads' share; the others add theirs
    full[sp.u_rank * hl:(sp.u_rank + 1) * hl] = ds
    return dq, dk, dv, full


@ring_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, sinks, cu_seqlens, position_ids, group_name, causal, layout,
      schedule, backend, softmax_scale, window, softcap, interconnect, ulysses):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            sinks.new_empty(sinks.shape) if sinks is not None else q.new_empty(0))


def _setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, sinks, cu, pos, *args = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, sinks, cu, pos)
    ctx.args = tuple(args[:-1])  # all but grad
    ctx.mark_non_differentiable(lse)


def _backward(ctx: Any, dout: Tensor, _dlse: Tensor) -> tuple:
    q, k, v, out, lse, sinks, cu, pos = ctx.saved_tensors
    dq, dk, dv, ds = ring_attention_backward_op(dout.contiguous(), q, k, v, out, lse, sinks,
                                                cu, pos, *ctx.args)
    return (dq, dk, dv, ds if sinks is not None else None, None, None, *([None] * 11))


ring_attention_op.register_autograd(_backward, setup_context=_setup)


def compiled_call(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, group: Group,
                  layout: str, schedule: str, backend: str, softmax_scale: float | None,
                  stats: object, interconnect: object, cu_seqlens: object,
                  window: tuple[int, int], sinks: Tensor | None, softcap: float | None,
                  ulysses: object, mesh: object, grad: bool,
                  position_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`ring_attention` while torch.compile traces: the arguments as the op takes them;
    what it cannot take is refused by name (the same on every rank: it is the code).
    position_ids: read packed documents off them inside the op (no cu_seqlens given)."""
    if mesh is not None:
        raise ValueError("ring_attention under torch.compile takes group=, not mesh= (got "
                         f"{type(mesh).__name__}); Ulysses meshes run eager only")
    if ulysses != "auto" and (isinstance(ulysses, bool) or not isinstance(ulysses, int)
                              or ulysses < 1):
        raise ValueError(f"ulysses must be an int degree >= 1 or 'auto', got {ulysses!r}")
    if stats is not None:
        raise ValueError("ring_attention under torch.compile cannot record stats= (the op "
                         "runs outside Python's view); pass stats=None")
    if interconnect is not None and not isinstance(interconnect, str):
        raise ValueError(f"ring_attention under torch.compile takes interconnect by name, got "
                         f"{type(interconnect).__name__}")
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"window must be a (left, right) pair of ints, got {window!r}")
    cu = cu_seqlens
    if cu is not None and not isinstance(cu, Tensor):
        cu = torch.tensor(cu, dtype=torch.int32)
    name = "" if group is None else group.group_name
    return ring_attention_op(q, k, v, sinks, cu, position_ids, name, bool(causal), layout, schedule,
                             backend, softmax_scale, list(window), softcap, interconnect,
                             0 if ulysses == "auto" else ulysses, grad)
