"""The ring loop: forward and backward of exact attention over a sequence-parallel group.

One loop, parametrised by layout (which global positions each rank owns, turned into block
pieces by `masking`) and backend (which computes one block). Schedule `kv`: K and V travel
one hop per step while Q stays; the next block's transfer is posted before the current
block is computed, and the only wait is for the buffer about to be used.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .backends import Backend
from .comm import RingComm
from .masking import block_pieces
from .merge import merge_


@dataclass(frozen=True)
class RingSpec:
    """Everything the loop needs besides tensors; identical on every rank (checked upstream)."""
    layout: str
    causal: bool
    scale: float
    backend: Backend


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pieces(spec: RingSpec, comm: RingComm, step: int, s_local: int):
    src = (comm.rank - step) % comm.world  # owner of the K/V block held at this step
    return block_pieces(spec.layout, comm.world, comm.rank, s_local, src, s_local, spec.causal)


def ring_forward(q: Tensor, k: Tensor, v: Tensor, spec: RingSpec,
                 comm: RingComm) -> tuple[Tensor, Tensor]:
    """q [B, S, Hq, D], k/v [B, S, Hkv, D] (local shards) -> out (q.dtype), lse [B, Hq, S]."""
    b, s, hq, d = q.shape
    acc = acc_dtype(q.dtype)
    out = lse = None
    kv = torch.stack([k, v])  # one message per step, and a buffer we may overwrite
    spare = torch.empty_like(kv) if comm.world > 1 else None
    for step in range(comm.world):
        works = comm.exchange(kv, spare) if step + 1 < comm.world else None
        for p in _pieces(spec, comm, step, s):
            o, l = spec.backend.fwd(q[:, p.q], kv[0, :, p.k], kv[1, :, p.k], spec.scale, p.causal)
            if out is None and p.q == slice(0, s):  # first partial over every row: adopt it
                out = o.to(acc).contiguous()
                lse = l.to(acc).contiguous()
                continue
            if out is None:
                out = torch.zeros(b, s, hq, d, dtype=acc, device=q.device)
                lse = torch.full((b, hq, s), float("-inf"), dtype=acc, device=q.device)
            merge_(out[:, p.q], lse[:, :, p.q], o, l)
        if works is not None:
            comm.wait(works)
            kv, spare = spare, kv
    assert out is not None, "causal self-attention: every rank sees at least its own block"
    return out.to(q.dtype), lse


def ring_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  spec: RingSpec, comm: RingComm) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of the local shards, given the global out/lse of the local queries.

    K/V travel as in the forward; their gradient accumulators (fp32) travel one step behind
    and, after the last step, arrive at the rank that owns the K/V.
    """
    s = q.shape[1]
    acc = acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    kv = torch.stack([k, v])
    kv_spare = torch.empty_like(kv) if comm.world > 1 else None
    parts = [torch.empty(kv.shape, dtype=acc, device=q.device) for _ in range(2)]
    incoming = torch.empty_like(parts[0]) if comm.world > 1 else None
    grad_works = None
    for step in range(comm.world):
        kv_works = comm.exchange(kv, kv_spare) if step + 1 < comm.world else None
        part = parts[step % 2]  # the other one may still be in flight
        part.zero_()
        for p in _pieces(spec, comm, step, s):
            g = spec.backend.bwd(dout[:, p.q], q[:, p.q], kv[0, :, p.k], kv[1, :, p.k],
                                 out[:, p.q], lse[:, :, p.q], spec.scale, p.causal)
            dq[:, p.q] += g[0]
            part[0, :, p.k] += g[1]
            part[1, :, p.k] += g[2]
        if comm.world > 1:
            if step > 0:  # accumulator of this K/V block from the ranks that held it before
                comm.wait(grad_works)
                part += incoming
            grad_works = comm.exchange(part, incoming)
        if kv_works is not None:
            comm.wait(kv_works)
            kv, kv_spare = kv_spare, kv
    if comm.world > 1:
        comm.wait(grad_works)
        dkv = incoming  # our own K/V's gradient, summed over every rank's queries
    else:
        dkv = parts[0]
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)
