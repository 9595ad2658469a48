"""Public entry point: ring_attention (shard / unshard live in `sharding`)."""
from __future__ import annotations

import torch
from torch import Tensor

from .call import Call, agreed, run
from .comm import CommStats, Group
from .compiled import compiled_call
from .options import CHOICES
from .plan import Interconnect
from .sharding import shard, unshard

__all__ = ["SCHEDULES", "ring_attention", "shard", "unshard"]

SCHEDULES = CHOICES  # "auto" and the ring schedules (`ringmem.options`)


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
    grad = torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad
                                           for t in (q, k, v, sinks))
    if torch.compiler.is_compiling():  # one custom op the graph keeps (`ringmem.compiled`)
        out, lse = compiled_call(q, k, v, causal=causal, group=group, layout=layout,
                                 schedule=schedule, backend=backend,
                                 softmax_scale=softmax_scale, stats=stats,
                                 interconnect=interconnect, cu_seqlens=cu_seqlens,
                                 window=window, sinks=sinks, softcap=softcap,
                                 ulysses=ulysses, mesh=mesh, grad=grad)
        return (out, lse) if return_lse else out
    call = Call(q, k, v, causal, layout, schedule, backend, softmax_scale, interconnect,
                stats, cu_seqlens, window, sinks, softcap, ulysses, return_lse)
    out, lse = run(call, group, agreed(call, group, mesh, grad))
    return (out, lse) if return_lse else out
