"""shard / unshard: a rank's part of a full sequence and back, for every layout, packed
documents included (the "document" layout pads each document inside ringmem)."""
from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from .agree import agree
from .arguments import check_flag
from .comm import Group, gather_rows, group_rank_world
from .layouts import check_layout, global_permutation, local_len_error, positions, split_len
from .mesh import sequence_rank
from .packing import Packing, normalize, padded_len, position_ids, rows_of, source_index


def packing_digest(docs: Packing | None, shown: int = 56) -> str | None:
    """A packing as cross-rank agreement compares it: its offsets as text, so a mismatch
    shows the values; beyond `shown` characters cut in the middle, with a 56-bit digest of
    every offset appended (a bounded number of words). None: no packing."""
    if docs is None:
        return None
    text = "; ".join(str(list(row)) for row in docs)
    if len(text) <= shown:
        return text
    digest = hashlib.blake2b(repr(docs).encode(), digest_size=7).hexdigest()
    half = shown // 2 - 2  # both ends: a mismatch is often in the last offsets
    return f"{text[:half]} .. {text[-half:]} ({sum(map(len, docs))} offsets, digest {digest})"


def _check_dim(x: Tensor, dim: int) -> int:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(dim, int) or isinstance(dim, bool) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim!r} is out of range for a {x.dim()}-D tensor")
    return dim % x.dim()


def _packing(x: Tensor, dim: int, cu_seqlens: object, layout: str, seq_len: int | None,
             world: int) -> tuple[Packing | None, int]:
    """(packing, local length) of a call; the batch is dim 0 when rows differ."""
    if cu_seqlens is None:
        if layout == "document":
            raise ValueError("layout 'document' needs cu_seqlens (the packed documents)")
        return None, 0
    batch = x.shape[0] if dim > 0 else 1
    docs = normalize(cu_seqlens, batch, seq_len)
    if len(docs) > 1 and dim == 0:
        raise ValueError("cu_seqlens with one packing per row needs the batch at dim 0 and "
                         "the sequence at dim >= 1")
    return docs, (padded_len(docs, world) // world if layout == "document" else 0)


def _row_positions(layout: str, rank: int, world: int, local: int, docs: Packing | None,
                   rows: int) -> list[Tensor]:
    cus = rows_of(docs, rows) if docs is not None else [None] * rows
    return [positions(layout, rank, world, local, cu) for cu in cus]


def shard(x: Tensor, dim: int = 1, *, group: Group = None, layout: str = "zigzag",
          cu_seqlens: object = None, return_position_ids: bool = False,
          mesh: object = None) -> Tensor | tuple[Tensor, Tensor]:
    """This rank's shard of the full tensor `x` along `dim` (global positions per `layout`).

    x: [..., S, ...] with S divisible by the layout's chunk count (world, or 2*world for
    zigzag). Returns [..., S / world, ...]. Differentiable.

    cu_seqlens: the packed documents of the row (flash-attn offsets [0, ..., S]; one per
    batch row, batch at dim 0, when rows differ). Needed by layout "document", which pads
    each document to a multiple of 2 * world inside ringmem (pad rows are zero; pass the
    same cu_seqlens to `ring_attention` and `unshard`). return_position_ids: also return the
    position of each local token inside its document, [1 or B, S_local] int64 (what RoPE
    needs; 0 on pads). mesh: a 2-D mesh as `ring_attention` takes it, instead of `group`:
    the shard of sequence-parallel rank ring_rank * u + ulysses_rank of u * r.
    """
    dim = _check_dim(x, dim)
    check_layout(layout)
    check_flag("return_position_ids", return_position_ids)
    _, rank, world = sequence_rank(group, mesh)
    docs, local = _packing(x, dim, cu_seqlens, layout, x.shape[dim], world)
    if return_position_ids and docs is None:
        raise ValueError("return_position_ids needs cu_seqlens (positions restart per document)")
    if layout != "document":
        local = split_len(layout, x.shape[dim], world)
    n_rows = 1 if docs is None else len(docs)
    pos = _row_positions(layout, rank, world, local, docs, n_rows)
    if layout != "document":
        out = x.index_select(dim, pos[0].to(x.device))
    else:
        total = local * world
        src = [source_index(cu, world, total)[p] for cu, p in zip(docs, pos)]
        if n_rows == 1:
            out = _take(x, dim, src[0])
        else:
            out = torch.stack([_take(x[r], dim - 1, src[r]) for r in range(n_rows)])
    if not return_position_ids:
        return out
    ids = torch.stack([position_ids(p, cu, layout == "document", world, local * world)
                       for cu, p in zip(docs, pos)])
    return out, ids.to(x.device)


def _take(x: Tensor, dim: int, src: Tensor) -> Tensor:
    """x's rows `src` along dim, zeros where src < 0 (pads)."""
    src = src.to(x.device)
    out = x.index_select(dim, src.clamp(min=0))
    shape = [1] * x.dim()
    shape[dim] = src.numel()
    return out * (src >= 0).reshape(shape).to(out.dtype)


def unshard(x: Tensor, dim: int = 1, *, group: Group = None, layout: str = "zigzag",
            cu_seqlens: object = None) -> Tensor:
    """The full tensor, on every rank, from each rank's shard `x` along `dim` (inverse of
    `shard`; under layout "document" the pads are dropped). Shards must have the same shape
    and dtype on every rank. Not differentiable.
    """
    rank, world = group_rank_world(group)
    error, docs = None, None
    try:  # collected, not raised: a bad call on one rank must not strand the others
        dim = _check_dim(x, dim)
        check_layout(layout)
        err = local_len_error(layout, x.shape[dim], world)
        if err:
            raise ValueError(f"x.shape[{dim}]={x.shape[dim]}: {err}")
        docs, local = _packing(x, dim, cu_seqlens, layout,
                               None if layout == "document" else x.shape[dim] * world, world)
        if layout == "document" and local != x.shape[dim]:
            raise ValueError(f"cu_seqlens pads to {local} positions per rank under layout "
                             f"'document', but x.shape[{dim}]={x.shape[dim]}")
    except (TypeError, ValueError) as e:
        error = e
    ok = error is None
    agree("unshard", group, error, **{"x.shape": tuple(x.shape) if ok else None,
             "dtype": x.dtype if isinstance(x, Tensor) else None,
             "dim": dim if ok else None, "layout": layout if ok else None,
             "cu_seqlens": packing_digest(docs) if ok else None})
    if world == 1 and layout != "document":
        return x
    if world == 1:
        gathered = x
    else:
        # detached: not differentiable, and the gather writes into views of its output
        rows = gather_rows(x.detach().reshape(-1), group, world, op="unshard")  # [world, numel]
        gathered = torch.cat(rows.reshape(world, *x.shape).unbind(0), dim=dim)
    n = x.shape[dim]
    if layout != "document":
        return gathered.index_select(dim, _inverse(global_permutation(layout, world, n), x))
    full = []
    for r, cu in enumerate(docs):
        row = gathered if len(docs) == 1 else gathered[r]
        d = dim if len(docs) == 1 else dim - 1
        perm = global_permutation(layout, world, n, cu)
        padded = row.index_select(d, _inverse(perm, x))
        real = torch.nonzero(source_index(cu, world, n * world) >= 0).flatten()
        full.append(padded.index_select(d, real.to(x.device)))
    return full[0] if len(docs) == 1 else torch.stack(full)


def _inverse(perm: Tensor, like: Tensor) -> Tensor:
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel())
    return inverse.to(like.device)


def packing_of_positions(position_ids: Tensor, *, group: Group = None,
                         layout: str = "zigzag") -> list[int] | list[list[int]] | None:
    """cu_seqlens of the packed documents in this rank's shard of the global position ids
    [R, S_local] (a document starts wherever a position is not the previous one + 1, as
    transformers reads packed batches): one list, a list per row, or None when every row
    is one document. A collective (the ids are gathered)."""
    ids = unshard(position_ids.contiguous(), 1, group=group, layout=layout).to(torch.int64)
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1] + 1
    if not bool(starts[:, 1:].any()):
        return None
    s = ids.shape[1]
    rows = [[*row.nonzero().flatten().tolist(), s] for row in starts]
    return rows[0] if len(rows) == 1 else rows

