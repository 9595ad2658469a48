"""Greedy decoding with the LM head split over the ranks.

Every rank decodes the same tokens, so a replicated LM head computes the same
vocabulary-sized product on every rank: for a small model with a large vocabulary
(Gemma-3-270M: 262,144 x 640, 671 MB in float32) that product is most of a decode step's
time on a CPU. `split_head` lends the model a head over this rank's slice of the vocabulary
(a view of the weight: nothing is copied); `greedy` then takes each rank's best token and
one all-gather picks the global one. The model's own logit post-processing (Gemma's final
softcap, a logit scale) is elementwise, so it applies to the slice unchanged, and the
result is the replicated head's argmax (ties: the lowest token id, as `torch.argmax`).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..comm import Group, gather_rows, group_rank_world


def vocab_slice(vocab: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi): this rank's token ids (ceil(vocab / world) each, the last rank fewer)."""
    per = -(-vocab // world)
    return min(rank * per, vocab), min((rank + 1) * per, vocab)


@contextmanager
def split_head(model: Any, group: Group = None) -> Iterator[int]:
    """Inside the block `model`'s LM head covers this rank's vocabulary slice only (its
    logits are [..., hi - lo]); yields lo, the slice's first token id. The model's own
    head is restored on exit."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise TypeError(f"split_head needs a torch.nn.Linear LM head, got "
                        f"{type(head).__name__}")
    rank, world = group_rank_world(group)
    lo, hi = vocab_slice(head.out_features, rank, world)
    part = nn.Linear(head.in_features, hi - lo, bias=head.bias is not None,
                     device="meta", dtype=head.weight.dtype)
    part.weight = nn.Parameter(head.weight[lo:hi], requires_grad=False)
    if head.bias is not None:
        part.bias = nn.Parameter(head.bias[lo:hi], requires_grad=False)
    model.set_output_embeddings(part)
    try:
        yield lo
    finally:
        model.set_output_embeddings(head)


def greedy(logits: Tensor, lo: int, group: Group = None) -> Tensor:
    """The global argmax token id [B] (int64, the same on every rank) from each rank's
    logits [B, n] over its slice starting at token id `lo`."""
    _, world = group_rank_world(group)
    best = logits.float().argmax(-1)
    if world == 1:
        return best + lo
    value = logits.float().gather(-1, best[:, None])[:, 0]
    # float64 holds every float32 value and token id exactly
    mine = torch.stack([value.double(), (best + lo).double()], 1).flatten()
    rows = gather_rows(mine, group, world, op="greedy (vocabulary slices)")
    rows = rows.reshape(world, -1, 2)
    # ranks hold ascending ids: the first rank with the top value has the lowest id
    top = rows[..., 0].argmax(0)
    return rows[..., 1].gather(0, top[None])[0].long()
